"""The vocabulary of `finetune.settings.check`: which plain config values fit a parameter's annotation, a setting's
range, and both in words for error messages ("an integer >= 1 or -1", "a list of 2 numbers in [0, 1)").

A range (`setting_ranges = {"rank": ">=1"}` on the kit's own classes, `OUTSIDE_RANGES` in finetune/settings/check.py for
torch and Lightning) is one or more alternatives joined by " or ": a comparison (`>0`, `>=1`, `<=1`), an interval
(`[0, 1)`), or one value (`-1`); an alternative may start with `int` or `float` to apply to values of that type only
(`int >=0 or float [0, 1]`). The range of an option that takes a list of numbers (`betas`) applies to each element.
"""

from __future__ import annotations

import datetime
import enum
import inspect
import os
import pathlib
import re
import types
import typing
from collections import abc
from typing import Any, Literal

# -- ranges ----------------------------------------------------------------------------------------------------------

_COMPARISON = re.compile(r"^(>=|<=|>|<)\s*(\S+)$")
_INTERVAL = re.compile(r"^([\[(])\s*(\S+?)\s*,\s*(\S+?)\s*([\])])$")


class Range:
    """A parsed `setting_ranges` entry (see the module docstring)."""

    def __init__(self, spec: str):
        self.spec, self.alternatives = spec, []
        for part in spec.split(" or "):
            part = part.strip()
            kind = None
            for prefix in ("int", "float"):
                if part.startswith(prefix + " ") or (part.startswith(prefix) and part[len(prefix):][:1] in "[(<>="):
                    kind, part = prefix, part[len(prefix):].strip()
            self.alternatives.append((kind, self._test(part), part))

    @staticmethod
    def _test(part: str):
        if match := _COMPARISON.match(part):
            op, bound = match.group(1), float(match.group(2))
            return {">": lambda v: v > bound, ">=": lambda v: v >= bound, "<": lambda v: v < bound,
                    "<=": lambda v: v <= bound}[op]
        if match := _INTERVAL.match(part):
            low, high = float(match.group(2)), float(match.group(3))
            closed_low, closed_high = match.group(1) == "[", match.group(4) == "]"
            return lambda v: (v >= low if closed_low else v > low) and (v <= high if closed_high else v < high)
        try:
            exact = float(part)
        except ValueError:
            raise ValueError(f"setting range {part!r}: use >0, >=1, [0, 1), -1 or such, joined by ' or '") from None
        return lambda v: v == exact

    def contains(self, value) -> bool:
        for kind, test, _ in self.alternatives:
            if kind == "int" and not isinstance(value, int) or kind == "float" and not isinstance(value, float):
                continue
            if test(value):
                return True
        return False

    def describe(self) -> str:
        words = {"int": "an integer ", "float": "a number "}
        parts = []
        for kind, _, text in self.alternatives:
            text = re.sub(r"^(>=|<=|>|<)\s*", r"\1 ", text)
            parts.append(f"{words[kind] if kind else ''}{'in ' if text[0] in '[(' else ''}{text}")
        return " or ".join(parts)

    def example(self):
        kind, _, text = self.alternatives[0]
        if match := _COMPARISON.match(text):
            bound = float(match.group(2))
            value = {">": bound + 1, ">=": bound, "<": bound - 1, "<=": bound}[match.group(1)]
        elif match := _INTERVAL.match(text):
            low, high = float(match.group(2)), float(match.group(3))
            value = low if match.group(1) == "[" else (low + high) / 2
        else:
            value = float(text)
        return int(value) if kind != "float" and value == int(value) else value


# -- types ----------------------------------------------------------------------------------------------------------

def annotations_of(target) -> dict[str, Any]:
    """Parameter name -> annotation object; `Any` where it cannot be resolved (a forward reference)."""
    function = target.__init__ if inspect.isclass(target) else target
    raw = {name: p.annotation for name, p in inspect.signature(target).parameters.items()}
    try:
        hints = typing.get_type_hints(function)
    except Exception:  # one unresolvable annotation fails all of them: resolve one by one
        hints = {}
        namespace = {**vars(typing), **getattr(function, "__globals__", {})}
        for name, annotation in raw.items():
            if isinstance(annotation, str):
                try:
                    hints[name] = eval(annotation, namespace)  # noqa: S307 -- the target's own annotation text
                except Exception:
                    hints[name] = Any
    return {name: hints.get(name, Any if annotation is inspect.Parameter.empty else annotation)
            for name, annotation in raw.items()}


_SINGULAR = {bool: "true or false", str: "a string", dict: "a mapping", list: "a list", tuple: "a list",
             pathlib.Path: "a path", os.PathLike: "a path"}
_PLURAL = {bool: "booleans", str: "strings"}


def members(annotation) -> list:
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return [m for a in typing.get_args(annotation) for m in members(a)]
    return [annotation]


def _is_object(annotation) -> bool:
    """A class no plain config value can be (only a node with `_target_` builds one)."""
    return (inspect.isclass(annotation) and annotation not in _SINGULAR and annotation not in (int, float, type(None))
            and not issubclass(annotation, enum.Enum)) or annotation is datetime.timedelta


def describe(annotation, bounds: Range | None = None, plural: bool = False) -> str:
    """What a value of `annotation` (within `bounds`) is, in words: "an integer >= 1 or -1", "a list of 2 numbers
    in [0, 1)", "one of fit, test"."""
    options = members(annotation)
    parts, literals = [], []
    element_bounds = None if _scalar_number(annotation) else bounds
    numeric = [m for m in options if m in (int, float)]
    if numeric:
        kind = ("numbers" if plural else "a number") if float in numeric else ("integers" if plural else "an integer")
        if bounds is not None and any(k for k, _, _ in bounds.alternatives):
            kind = bounds.describe()
        elif bounds is not None:
            kind = f"{kind} {bounds.describe()}"
        parts.append(kind)
    for member in options:
        origin, args = typing.get_origin(member), typing.get_args(member)
        if member in numeric or member is type(None):
            continue
        if origin is Literal:
            literals += [as_text(a) for a in args]
        elif inspect.isclass(member) and issubclass(member, enum.Enum):
            literals += [m.name for m in member]
        elif origin is tuple and args and args[-1] is not Ellipsis:
            parts.append(f"a list of {len(args)} {describe(args[0], element_bounds, plural=True)}")
        elif origin in (list, tuple, set, frozenset, abc.Sequence, abc.Iterable, abc.MutableSequence, abc.Collection):
            parts.append(f"a list of {describe(args[0], element_bounds, plural=True)}" if args else "a list")
        elif origin in (dict, abc.Mapping, abc.MutableMapping):
            parts.append("a mapping")
        elif member in _SINGULAR:
            parts.append(_PLURAL.get(member, "values") if plural else _SINGULAR[member])
        elif not _is_object(member):
            parts.append("values" if plural else "a value")
    if literals:
        parts.append("one of " + ", ".join(dict.fromkeys(literals)))
    if not parts:  # only classes: say which
        names = [getattr(m, "__name__", str(m)) for m in options if m is not type(None)]
        parts.append(f"a {' or '.join(names)} (a node with _target_)")
    if type(None) in options:
        parts.append("null")
    return " or ".join(dict.fromkeys(parts))


def matches(value, annotation) -> bool:
    """Whether a config value (a plain container: None, bool, int, float, str, list, dict) fits the annotation."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if annotation in (Any, object, inspect.Parameter.empty) or isinstance(annotation, (typing.TypeVar, str,
                                                                                        typing.ForwardRef)):
        return True
    if origin in (typing.Union, types.UnionType):
        return any(matches(value, a) for a in args)
    if origin is Literal:
        return any(type(value) is type(a) and value == a for a in args)
    if isinstance(value, dict) and "_target_" in value:
        return True  # a nested object, built by Hydra: its own node is checked on its own
    if annotation is type(None) or annotation is None:
        return value is None
    if annotation is bool:
        return isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if annotation is str:
        return isinstance(value, str)
    if annotation in (pathlib.Path, os.PathLike) or annotation in (pathlib.PurePath,):
        return isinstance(value, str)
    if origin is tuple or annotation is tuple:
        if not isinstance(value, list):
            return False
        if not args or args[-1] is Ellipsis:
            return all(matches(v, args[0]) for v in value) if args else True
        return len(value) == len(args) and all(matches(v, a) for v, a in zip(value, args))
    if origin in (list, abc.Sequence, abc.Iterable, abc.MutableSequence, abc.Collection, set, frozenset) or \
            annotation in (list, set, frozenset, abc.Sequence, abc.Iterable):
        return isinstance(value, list) and (not args or all(matches(v, args[0]) for v in value))
    if origin in (dict, abc.Mapping, abc.MutableMapping) or annotation in (dict, abc.Mapping):
        return isinstance(value, dict) and (len(args) < 2 or all(matches(v, args[1]) for v in value.values()))
    if inspect.isclass(annotation) and issubclass(annotation, enum.Enum):
        names = {m.name.lower() for m in annotation} | {str(m.value).lower() for m in annotation}
        return isinstance(value, str) and value.lower() in names
    if annotation in (datetime.timedelta,):
        return False
    if origin is not None or not inspect.isclass(annotation) or annotation is abc.Callable or origin is abc.Callable:
        return True  # Callable, type[...], protocols: nothing a config value can be checked against
    return False  # another class: only a node with `_target_` builds one


# -- values ---------------------------------------------------------------------------------------------------------

def as_text(value) -> str:
    """A value as it is written on the command line."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return value if value and re.fullmatch(r"[\w./:@+-]+", value) else repr(value)
    if isinstance(value, list):
        return "[" + ", ".join(as_text(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {as_text(v)}" for k, v in value.items()) + "}"
    return str(value)


def _scalar_number(annotation) -> bool:
    return any(m in (int, float) for m in members(annotation))


def _numbers(value, annotation) -> list:
    """The numbers a range applies to: the value, or a list's elements when the option takes no single number
    (`betas`; but `devices: int | list[int]` ranges the count, not the device indices)."""
    if isinstance(value, list):
        return [] if _scalar_number(annotation) else [n for v in value for n in _numbers(v, None)]
    return [value] if isinstance(value, (int, float)) and not isinstance(value, bool) else []


def fits(value, annotation, allowed: Range | None) -> bool:
    return matches(value, annotation) and (allowed is None or all(allowed.contains(n)
                                                                   for n in _numbers(value, annotation)))
