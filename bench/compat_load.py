"""Load LoRA files the way users' tools do, in whatever diffusers/peft this interpreter has; print one JSON line per
(loader, file). Run by `bench/compat.py` inside its small venvs: it imports nothing of the kit (the kit needs newer
libraries than many users run).

    python compat_load.py JOB.json

JOB: {"checkpoint": DIR, "pipeline": "CogVideoXPipeline", "expected": FILE, "files": {label: path}}. `expected` holds,
per module of the transformer (diffusers names), the update the training model applied (`scale * B @ A`). For each
loader the script loads the file into a fresh pipeline, fuses it at strength 1 and compares the weights' change with
the expected one: modules changed, max abs error, and the scale ratio <applied, expected> / <expected, expected>.

Loaders:
- `diffusers`: `pipe.load_lora_weights(dir, weight_name=NAME, adapter_name="a")`, `pipe.fuse_lora(components=
  ["transformer"], lora_scale=1.0)`: diffusers' documented path.
- `wrapper`: ComfyUI-CogVideoXWrapper's loader block (`model_loading.py`, non-Fun models): read the file, take the rank
  from the first `lora_B` key, `load_lora_weights(path, weight_name=..., lora_rank=rank, adapter_name=...)`,
  `set_adapters([name], [1.0])`, `fuse_lora(lora_scale=1, components=["transformer"])`.
- `peft`: PEFT on the bare transformer: `LoraConfig(**header metadata)`, `inject_adapter_in_model`,
  `set_peft_model_state_dict` (what a user without diffusers' loader mixin does).
"""

from __future__ import annotations

import json
import sys
import traceback
from pathlib import Path

import torch


def fresh_pipeline(job: dict):
    import diffusers

    pipeline = getattr(diffusers, job["pipeline"])
    return pipeline.from_pretrained(job["checkpoint"], text_encoder=None, tokenizer=None, torch_dtype=torch.float32)


def weights(module) -> dict[str, torch.Tensor]:
    """Every Linear-like weight by module name, without peft's wrappers (`base_layer`)."""
    out = {}
    for name, sub in module.named_modules():
        weight = getattr(sub, "weight", None)
        if isinstance(weight, torch.Tensor) and weight.dim() == 2 and "lora_" not in name:
            out[name.replace(".base_layer", "")] = weight.detach().clone().float()
    return out


def load_diffusers(pipe, path: Path):
    pipe.load_lora_weights(str(path.parent), weight_name=path.name, adapter_name="a")
    pipe.fuse_lora(components=["transformer"], lora_scale=1.0)


def load_wrapper(pipe, path: Path):
    from safetensors.torch import load_file

    state = load_file(str(path))
    rank = next((v.shape[1] for k, v in state.items() if "lora_B" in k), None)
    if rank is None:
        raise ValueError("no lora_B key: the wrapper's diffusers branch does not take this file")
    name = path.name.split(".")[0]
    pipe.load_lora_weights(str(path), weight_name=path.name, lora_rank=rank, adapter_name=name)
    pipe.set_adapters([name], adapter_weights=[1.0])
    pipe.fuse_lora(lora_scale=1, components=["transformer"])


def load_peft(pipe, path: Path):
    from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        header = json.loads((f.metadata() or {}).get("lora_adapter_metadata", "{}"))
        state = {k.removeprefix("transformer."): f.get_tensor(k) for k in f.keys()}
    if not header:
        raise ValueError("no lora_adapter_metadata header: PEFT needs the LoraConfig")
    config = LoraConfig(**{k.removeprefix("transformer."): v for k, v in header.items()})
    inject_adapter_in_model(config, pipe.transformer, adapter_name="default")
    result = set_peft_model_state_dict(pipe.transformer, state, adapter_name="default")
    if getattr(result, "unexpected_keys", None):
        raise ValueError(f"{len(result.unexpected_keys)} unexpected keys, e.g. {result.unexpected_keys[0]}")
    from peft.tuners.lora import LoraLayer

    for module in pipe.transformer.modules():
        if isinstance(module, LoraLayer):
            module.merge(adapter_names=["default"])


LOADERS = {"diffusers": load_diffusers, "wrapper": load_wrapper, "peft": load_peft}


def measure(job: dict, loader: str, path: Path, expected: dict[str, torch.Tensor]) -> dict:
    pipe = fresh_pipeline(job)
    before = weights(pipe.transformer)
    try:
        LOADERS[loader](pipe, path)
    except Exception as err:  # what the user sees: the loader's own error
        return {"loads": False, "error": f"{type(err).__name__}: {str(err).splitlines()[0][:160]}"}
    after = weights(pipe.transformer)
    changed = sorted(n for n in before if not torch.equal(before[n], after[n]))
    dot = sum(float(((after[n] - before[n]) * e).sum()) for n, e in expected.items() if n in after)
    norm = sum(float((e * e).sum()) for e in expected.values())
    error = max(float((after[n] - before[n] - e).abs().max()) if n in after else float(e.abs().max())
                for n, e in expected.items())
    extra = [n for n in changed if n not in expected]
    return {"loads": bool(changed), "modules": len(changed), "expected_modules": len(expected),
            "unexpected_modules": len(extra), "max_error": error, "scale_ratio": dot / norm if norm else None}


def main(job_file: str) -> None:
    import diffusers
    import peft
    from safetensors.torch import load_file

    job = json.loads(Path(job_file).read_text())
    versions = {"diffusers": diffusers.__version__, "peft": peft.__version__}
    for label, entry in job["files"].items():
        expected = load_file(entry["expected"])
        for loader in entry.get("loaders", list(LOADERS)):
            try:
                result = measure(job, loader, Path(entry["path"]), expected)
            except Exception:  # the harness itself failed: say so, do not count it as the loader's verdict
                result = {"loads": None, "error": "harness: " + traceback.format_exc().splitlines()[-1][:200]}
            print(json.dumps({**versions, "file": label, "loader": loader, **result}), flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
