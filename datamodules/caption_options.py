"""What kohya / ai-toolkit users look for in a dataset: a trigger word, several roots with repeats, caption dropout.

- `data.trigger`: a word (or phrase) put in front of every caption, as `"TRIGGER, caption"` (kept as it is where the
  caption already starts with it). The caption is part of every sample key, so a new trigger re-encodes the captions
  (the media's encodings are computed again too: one cache entry holds both).
- `data.roots`: several data folders mixed, `[{root: A, repeats: 2}, {root: B}]`: each read as `data.root` would be
  (any layout), its samples listed `repeats` times (default 1) per epoch. A repeated sample has the same key as its
  first copy: it is encoded and cached once and read again, and an epoch is that many samples longer.
- `data.caption_dropout`: the fraction of training samples whose caption is replaced by the empty prompt, drawn
  per sample and step (`finetune.dropout`); the empty prompt's encoding is computed once and cached beside the
  samples' (`empty_prompt_key`), the samples' keys do not change.
"""

from __future__ import annotations

from dataclasses import dataclass

from datamodules.textfiles import DataError


@dataclass(frozen=True)
class DataRoot:
    root: str
    repeats: int = 1


def with_trigger(caption: str, trigger: str | None) -> str:
    """`caption` with `trigger` in front (`"TRIGGER, caption"`), unless it starts with it already."""
    if not trigger:
        return caption
    trigger = trigger.strip()
    if caption == trigger or caption.startswith((trigger + ",", trigger + " ")):
        return caption
    return f"{trigger}, {caption}"


def parse_roots(roots, root: str | None) -> list[DataRoot] | None:
    """`data.roots` as DataRoots (None: not set, `data.root` is read); a bad entry is a DataError naming it."""
    if not roots:
        if root in (None, ""):
            raise DataError("data.root is null and data.roots is not set: point data.root at the data (or demo), or "
                            "list several folders in data.roots ([{root: A, repeats: 2}, {root: B}]).")
        return None
    if root not in (None, "", "demo"):
        raise DataError(f"data.root={root!r} and data.roots are both set: list every folder in data.roots "
                        f"([{{root: A, repeats: 2}}, {{root: B}}]) and set data.root=null.")
    parsed = []
    for number, entry in enumerate(roots):
        if isinstance(entry, str):
            entry = {"root": entry}
        entry = dict(entry) if hasattr(entry, "keys") else entry
        if not isinstance(entry, dict) or not entry.get("root") or set(entry) - {"root", "repeats"}:
            raise DataError(f"data.roots[{number}]={entry!r}: each entry is {{root: FOLDER, repeats: N}} (repeats "
                            f"optional, default 1).")
        repeats = entry.get("repeats", 1)
        if not isinstance(repeats, int) or isinstance(repeats, bool) or repeats < 1:
            raise DataError(f"data.roots[{number}].repeats={repeats!r}: a whole number >= 1 (how many times its "
                            f"samples appear per epoch).")
        parsed.append(DataRoot(str(entry["root"]), repeats))
    return parsed


def check_dropout(caption_dropout: float) -> float:
    if not isinstance(caption_dropout, (int, float)) or isinstance(caption_dropout, bool) or \
            not 0.0 <= caption_dropout < 1.0:
        raise DataError(f"data.caption_dropout={caption_dropout!r}: a fraction in [0, 1) of the training samples "
                        f"trained with the empty prompt (e.g. 0.05; 0: off).")
    return float(caption_dropout)


def repeated(items: list, repeats: int) -> list:
    return [item for _ in range(repeats) for item in items]


def child_module(module, root: str):
    """A data module of `module`'s class and settings reading `root` alone (one entry of `data.roots`), connected
    to the same processor."""
    import inspect

    names = [n for n in inspect.signature(type(module).__init__).parameters if n != "self"]
    child = type(module)(**{**{n: getattr(module, n) for n in names}, "root": root, "roots": None})
    child.connect(module.require_processor())
    return child
