"""LoRA files as the ecosystem writes them, for any model: reading (safetensors with their header, PEFT folders, SAT
checkpoints), their layout, rank and alpha and where those come from, as one `Adapter`; writing an `Adapter` in each
layout (and folding alpha into `lora_B`): `finetune/lora_formats/writing.py`.

Nothing here knows a model. Module names are the network's own (diffusers/peft names, e.g.
`transformer_blocks.0.attn1.to_q`); a family that has other spellings (native ComfyUI names, SAT checkpoints) declares
them as a `LoraNames` (`ModelFamily.lora_names`), built from `NameMap` templates.

What each loader makes of a file: `finetune/lora_formats/loaders.py`.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from finetune.errors import UserError

DIFFUSERS_FILE = "pytorch_lora_weights.safetensors"
PEFT_FILE, PEFT_CONFIG = "adapter_model.safetensors", "adapter_config.json"
COGKIT_RANK, COGKIT_ALPHA = 128, 64  # CogKit (and the official CogVideo finetune) hard-code these, saving neither
SUFFIXES = {".lora_A.weight": "A", ".lora_B.weight": "B", ".lora_down.weight": "A", ".lora_up.weight": "B",
            ".alpha": "alpha"}


class LoraFileError(UserError, ValueError):
    """A LoRA file that cannot be read or converted as asked; the message names the file and the fix."""


# -- module names ----------------------------------------------------------------------------------
class NameMap:
    """Two spellings of the same modules, as template pairs `(ours, theirs)` with `{n}` for a block index, e.g.
    `("transformer_blocks.{n}.attn1.to_q", "blocks.{n}.q")`. A name matching no template has no counterpart."""

    def __init__(self, pairs: list[tuple[str, str]]):
        self.pairs = list(pairs)
        self._forward = [(_template_regex(a), b) for a, b in self.pairs]
        self._backward = [(_template_regex(b), a) for a, b in self.pairs]
        self._kohya = [(_template_regex(a, sep="_"), a) for a, _ in self.pairs] + \
                      [(_template_regex(b, sep="_"), b) for _, b in self.pairs]

    @staticmethod
    def _apply(rules, name: str) -> str | None:
        for regex, template in rules:
            match = regex.fullmatch(name)
            if match:
                return template.format(**match.groupdict())
        return None

    def to_theirs(self, name: str) -> str | None:
        return self._apply(self._forward, name)

    def to_ours(self, name: str) -> str | None:
        return self._apply(self._backward, name)

    def from_underscored(self, spelled: str) -> str | None:
        """`transformer_blocks_0_attn1_to_q` (kohya's spelling) -> the dotted name in either spelling."""
        return self._apply(self._kohya, spelled)


def _template_regex(template: str, sep: str = ".") -> re.Pattern:
    parts = re.split(r"(\{n\})", template.replace(".", sep) if sep != "." else template)
    return re.compile("".join(r"(?P<n>\d+)" if part == "{n}" else re.escape(part) for part in parts))


@dataclass
class LoraNames:
    """What a family tells the tools about its module names.

    Args:
        modules: every module a LoRA may target, ours <-> native ComfyUI names (None: native ComfyUI does not run
            this model, so no ComfyUI file is written for it).
        prefix: the diffusers key prefix of the trained network (`transformer.`).
        native_prefix: the native ComfyUI prefix (`diffusion_model.`).
        sat: SAT checkpoint names: ours (with `{n}`) <-> the SAT LoRA matrix without its `matrix_A/B.i` tail,
            e.g. `("transformer_blocks.{n}.attn1.to_q", "transformer.layers.{n}.attention.query_key_value#0")`,
            `#i` naming the SAT split index. None: no SAT format.
        sat_prefix: the SAT checkpoint's key prefix (`model.diffusion_model.`).
    """

    modules: NameMap | None = None
    prefix: str = "transformer."
    native_prefix: str = "diffusion_model."
    sat: NameMap | None = None
    sat_prefix: str = "model.diffusion_model."

    def native(self, module: str) -> str:
        name = self.modules.to_theirs(module) if self.modules else None
        if name is None:
            raise LoraFileError(f"module {module!r} has no native ComfyUI name"
                                + ("" if self.modules else ": native ComfyUI does not run this model"))
        return name


# -- one LoRA, in the network's own names ---------------------------------------------------------
@dataclass
class LoraModule:
    A: torch.Tensor  # [rank, in]
    B: torch.Tensor  # [out, rank]
    alpha: float

    @property
    def rank(self) -> int:
        return int(self.A.shape[0])

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def delta(self) -> torch.Tensor:
        """The trained update `alpha / rank * B @ A` (fp32)."""
        return self.scale * (self.B.float().flatten(1) @ self.A.float().flatten(1))


@dataclass
class Adapter:
    """A LoRA as {module name: A, B, alpha}, whatever file it came from; `alpha_source` says where alpha was read."""

    modules: dict[str, LoraModule]
    layout: str = "diffusers"
    alpha_source: str = ""

    def ranks(self) -> set[int]:
        return {m.rank for m in self.modules.values()}

    def alphas(self) -> set[float]:
        return {m.alpha for m in self.modules.values()}

    def deltas(self) -> dict[str, torch.Tensor]:
        return {name: m.delta() for name, m in self.modules.items()}


# -- reading ---------------------------------------------------------------------------------------
@dataclass
class LoraFile:
    path: Path
    tensors: dict[str, torch.Tensor]
    header: dict[str, str] = field(default_factory=dict)
    config: dict | None = None  # adapter_config.json beside a PEFT file

    @property
    def diffusers_metadata(self) -> dict | None:
        raw = self.header.get("lora_adapter_metadata")
        return json.loads(raw) if raw else None

    @property
    def finetrainers_config(self) -> dict | None:
        raw = self.header.get("lora_config")
        return json.loads(raw) if raw else None


def query_widths(shapes: dict[str, tuple[int, ...]]) -> set[int]:
    """The input widths of the LoRAs on attention query projections (`attn1.to_q` in any spelling): the model's
    hidden size, for `ModelFamily.recognize_lora`."""
    return {shape[-1] for key, shape in shapes.items()
            if re.search(r"attn1[._]to_q[._]lora_(A|down)", key) and len(shape) >= 2}


def find_lora_file(path: str | Path) -> Path:
    """A file, or the LoRA file in a folder (diffusers' name, PEFT's, else the folder's only .safetensors)."""
    path = Path(path).expanduser()
    if path.is_file():
        return path
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no such file or folder; pass a LoRA .safetensors file or the folder that "
                                f"holds it (e.g. a run's export/).")
    for name in (DIFFUSERS_FILE, PEFT_FILE):
        if (path / name).is_file():
            return path / name
    candidates = sorted(path.glob("*.safetensors"))
    if len(candidates) == 1:
        return candidates[0]
    raise FileNotFoundError(f"{path} holds {len(candidates) or 'no'} .safetensors files and neither {DIFFUSERS_FILE} "
                            f"nor {PEFT_FILE}: pass the LoRA file itself.")


def read_lora_file(path: str | Path) -> LoraFile:
    """Tensors, header and (PEFT) adapter_config.json. `.pt`/`.bin` (SAT `mp_rank_00_model_states.pt`) are read with
    `torch.load(weights_only=True)`: tensors and plain values only."""
    file = find_lora_file(path)
    if file.suffix == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(file), framework="pt") as f:
                header = dict(f.metadata() or {})
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as err:
            raise LoraFileError(f"{file}: not a readable safetensors file ({type(err).__name__}: {err}).") from None
    else:
        try:
            state = torch.load(file, map_location="cpu", weights_only=True)
        except Exception as err:
            raise LoraFileError(f"{file}: cannot be read with torch.load(weights_only=True) ({type(err).__name__}: "
                                f"{str(err).splitlines()[0] if str(err) else ''}); the kit does not unpickle code. "
                                f"Re-save its tensors as safetensors.") from None
        for key in ("module", "state_dict", "model"):  # SAT/DeepSpeed nest the weights
            while isinstance(state, dict) and isinstance(state.get(key), dict):
                state = state[key]
        tensors = {k: v for k, v in state.items() if torch.is_tensor(v)}
        header = {}
    config_path = file.with_name(PEFT_CONFIG)
    config = json.loads(config_path.read_text()) if config_path.is_file() else None
    if not tensors:
        raise LoraFileError(f"{file} holds no tensors.")
    return LoraFile(file, tensors, header, config)


def detect_layout(file: LoraFile) -> str:
    """`sat`, `native` (ComfyUI native names), `kohya` (`lora_unet_*`), `finetrainers`, `diffusers`, `peft`
    (`base_model.model.*`, PEFT's save_pretrained) or `peft-bare` (no prefix: CogKit's adapter_model.safetensors)."""
    keys = list(file.tensors)
    if any(".matrix_A." in k or ".matrix_B." in k for k in keys):
        return "sat"
    if all(k.startswith("lora_unet_") for k in keys):
        return "kohya"
    if all(k.startswith("diffusion_model.") for k in keys):
        return "native"
    if all(k.startswith("base_model.model.") for k in keys):
        return "peft"
    if any(".lora_A." in k or ".lora_B." in k for k in keys):
        # fully trained modules beside the pairs: a PEFT file, unless diffusers' header says it is one of diffusers'
        # (the kit's export of a LoRA with `adapter.modules`, e.g. CogView4 control's widened patch embedding)
        if all(k.startswith("transformer.") for k in keys) and (not full_tensors(file) or file.diffusers_metadata):
            return "finetrainers" if file.finetrainers_config and not file.diffusers_metadata else "diffusers"
        return "peft-bare"
    raise LoraFileError(f"{file.path}: no LoRA layout the kit knows (keys such as {keys[0]!r}); expected diffusers "
                        f"(`transformer.*.lora_A.weight`), PEFT, kohya (`lora_unet_*`), native ComfyUI "
                        f"(`diffusion_model.*`) or SAT (`*.matrix_A.0`) keys.")


def _split(keys, strip: str = "", others_ok: bool = False) -> dict[str, dict[str, str]]:
    """key -> (module, part) grouped: {module: {"A": key, "B": key, "alpha": key}}. `others_ok`: skip tensors that
    are not LoRA's (PEFT's fully trained `modules_to_save`)."""
    groups: dict[str, dict[str, str]] = {}
    for key in keys:
        body = key.removeprefix(strip)
        for suffix, part in SUFFIXES.items():
            if body.endswith(suffix):
                groups.setdefault(body[: -len(suffix)], {})[part] = key
                break
        else:
            if not others_ok:
                raise LoraFileError(f"key {key!r} is not a LoRA A/B/alpha tensor")
    return groups


def full_tensors(file: LoraFile) -> list[str]:
    """Tensors that are not LoRA A/B/alpha: modules a PEFT adapter trains fully (`modules_to_save`)."""
    return [k for k in file.tensors if not k.endswith(tuple(SUFFIXES)) and ".matrix_" not in k]


def _pattern_value(module: str, patterns: dict, default):
    for pattern, value in (patterns or {}).items():
        if module == pattern or re.fullmatch(rf"(.*\.)?{pattern}", module):
            return value
    return default


def to_adapter(file: LoraFile, names: LoraNames | None = None, alpha: float | None = None) -> Adapter:
    """The file's LoRA in the network's own module names. `alpha` overrides what the file says (and is required
    where it says nothing: a diffusers-example file without metadata, a bare PEFT file of a rank other than 128)."""
    names = names or LoraNames()
    layout = detect_layout(file)
    tensors = file.tensors
    if layout == "sat":
        return _sat_adapter(file, names, alpha)
    strip = {"diffusers": names.prefix, "finetrainers": names.prefix, "peft": "base_model.model.",
             "peft-bare": "", "native": names.native_prefix, "kohya": "lora_unet_"}[layout]
    groups = _split(tensors, strip, others_ok=layout in ("peft", "peft-bare", "diffusers"))
    renamed: dict[str, dict[str, str]] = {}
    for module, parts in groups.items():
        if layout == "native":
            ours = names.modules.to_ours(module) if names.modules else None
        elif layout == "kohya":
            spelled = names.modules.from_underscored(module) if names.modules else None
            ours = names.modules.to_ours(spelled) if spelled and names.modules.to_ours(spelled) else spelled
        else:
            ours = module
        if ours is None:
            raise LoraFileError(f"{file.path}: {layout} module {module!r} matches no module of this model family; "
                                f"pass the right --family.")
        renamed[ours] = parts
    rank_of = {m: int(tensors[p["A"]].shape[0]) for m, p in renamed.items() if "A" in p}
    alpha_of, source = _alphas(file, layout, renamed, rank_of, alpha)
    modules = {}
    for module, parts in sorted(renamed.items()):
        if "A" not in parts or "B" not in parts:
            raise LoraFileError(f"{file.path}: module {module!r} lacks its {'lora_B' if 'A' in parts else 'lora_A'}.")
        modules[module] = LoraModule(tensors[parts["A"]], tensors[parts["B"]], float(alpha_of[module]))
    return Adapter(modules, layout=layout, alpha_source=source)


def _alphas(file: LoraFile, layout: str, parts: dict, rank_of: dict, alpha: float | None):
    if alpha is not None:
        return {m: alpha for m in parts}, "--alpha"
    if layout in ("kohya", "native"):
        found = {m: float(file.tensors[p["alpha"]]) for m, p in parts.items() if "alpha" in p}
        missing = [m for m in parts if m not in found]
        if missing and not found:
            return {m: rank_of[m] for m in parts}, "none in the file: factor 1.0 (alpha = rank)"
        if missing:
            raise LoraFileError(f"{file.path}: {len(missing)} modules have no .alpha (e.g. {missing[0]}) while others "
                                f"do; pass --alpha.")
        return found, "per-module .alpha tensors"
    config, source = None, ""
    if layout == "diffusers" and file.diffusers_metadata:
        meta = file.diffusers_metadata
        config = {k.split(".", 1)[1]: v for k, v in meta.items() if "." in k} or meta
        source = "header lora_adapter_metadata"
    elif layout == "finetrainers":
        config, source = file.finetrainers_config, "header lora_config (finetrainers)"
    elif layout in ("peft", "peft-bare") and file.config:
        config, source = file.config, PEFT_CONFIG
    if config is not None:
        default = config.get("lora_alpha", config.get("alpha"))
        if default is None:
            raise LoraFileError(f"{file.path}: {source} has no lora_alpha; pass --alpha.")
        return {m: _pattern_value(m, config.get("alpha_pattern"), default) for m in parts}, source
    if layout == "peft-bare" and set(rank_of.values()) == {COGKIT_RANK}:
        return {m: COGKIT_ALPHA for m in parts}, (f"assumed: CogKit's fixed r {COGKIT_RANK} / alpha {COGKIT_ALPHA} "
                                                  f"(the file stores none; --alpha to override)")
    rank = sorted(set(rank_of.values()))
    raise LoraFileError(
        f"{file.path} stores no alpha ({layout} keys, no lora_adapter_metadata, lora_config or {PEFT_CONFIG}). "
        f"Loaders would apply it at alpha = rank ({rank}), which is not what it was trained with unless alpha was "
        f"the rank: the diffusers example scripts save no alpha and say to call set_adapters with alpha / rank. "
        f"Pass --alpha with the training value (e.g. --alpha 64 for rank 128).")


def _sat_adapter(file: LoraFile, names: LoraNames, alpha: float | None) -> Adapter:
    """SAT: `<prefix><matrix>.matrix_A.i` (i: q/k/v split of query_key_value); alpha 1 (scale 1 / rank)."""
    if names.sat is None:
        raise LoraFileError(f"{file.path}: SAT keys, but this model family has no SAT names; pass the right --family.")
    groups: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in file.tensors.items():
        match = re.fullmatch(r"(.*)\.matrix_([AB])\.(\d+)", key.removeprefix(names.sat_prefix))
        if not match:
            continue
        ours = names.sat.to_ours(f"{match[1]}#{match[3]}")
        if ours is None:
            raise LoraFileError(f"{file.path}: SAT matrix {key!r} matches no module of this model family.")
        groups.setdefault(ours, {})[match[2]] = value
    modules = {m: LoraModule(p["A"], p["B"], 1.0 if alpha is None else alpha) for m, p in sorted(groups.items())}
    return Adapter(modules, layout="sat", alpha_source="--alpha" if alpha is not None else "SAT: alpha 1 (scale 1/r)")


def from_peft_state(state: dict[str, torch.Tensor], config: dict) -> Adapter:
    """peft's `get_peft_model_state_dict` (keys `<module>.lora_A.weight`) and its LoraConfig as a dict."""
    groups = _split(state)
    modules = {}
    for module, parts in sorted(groups.items()):
        modules[module] = LoraModule(state[parts["A"]], state[parts["B"]],
                                     float(_pattern_value(module, config.get("alpha_pattern"), config["lora_alpha"])))
    return Adapter(modules, layout="peft", alpha_source="peft config")


#: the header key where a folded file keeps what it was trained with (rank, alpha): `adapter_path` unfolds lora_B
#: with it; loaders never read it (docs/lora-formats.md#the-default-export)
TRAINED_KEY = "cogft_trained"


def trained_record(header: dict) -> dict | None:
    """What a folded file was trained with (`writing.diffusers_tensors(fold=True)`), or None for any other file."""
    raw = header.get(TRAINED_KEY)
    return json.loads(raw) if raw else None


#: the header key of the kit's record of what a LoRA was trained on and by: the base model (hub id and revision, or
#: a local folder and a hash of its configs), family and variant, recipe, global step, adapter settings, kit version
#: (one JSON value; `ModelFamily.model_record`). Loaders never read it (docs/lora-formats.md#the-model-record)
MODEL_KEY = "cogft_model"


def model_record(header: dict) -> dict | None:
    """The kit's `MODEL_KEY` record of a file, or None (an older kit's export, another tool's file)."""
    raw = header.get(MODEL_KEY)
    try:
        return json.loads(raw) if raw else None
    except json.JSONDecodeError:
        return None


def check_finite(tensors: dict[str, torch.Tensor], where: str) -> None:
    bad = [k for k, v in tensors.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise LoraFileError(f"{where}: {len(bad)} tensors hold NaN/inf (e.g. {bad[0]}); nothing was written.")


def _most_common(values):
    return max(set(values), key=values.count)
