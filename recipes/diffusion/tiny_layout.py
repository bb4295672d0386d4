"""Writing a tiny random model in the on-disk layout of a published diffusers checkpoint.

Each component goes to its own folder with `save_pretrained`, and `model_index.json` names the pipeline and
each component's library and class, as on the hub, so the real `Pipeline.from_pretrained` loads it and tests
run the same loading code as the real checkpoints.
"""

from __future__ import annotations

import json
from pathlib import Path

DIFFUSERS_VERSION = "0.42.1"


def save_diffusers_layout(root: str | Path, pipeline_class: str, components: dict,
                          class_names: dict[str, str] | None = None) -> Path:
    """`components`: folder name -> object with `save_pretrained` (model, scheduler, tokenizer).
    `class_names`: the hub's class name for a component whose Python class is spelled otherwise (transformers 5
    calls `PreTrainedTokenizerFast` `TokenizersBackend`)."""
    root = Path(root)
    index = {"_class_name": pipeline_class, "_diffusers_version": DIFFUSERS_VERSION}
    for name, component in sorted(components.items()):
        component.save_pretrained(root / name)
        library = type(component).__module__.split(".")[0]
        index[name] = [library, (class_names or {}).get(name, type(component).__name__)]
    (root / "model_index.json").write_text(json.dumps(index, indent=2))
    return root
