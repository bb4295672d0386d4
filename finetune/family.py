"""The one interface between the engine and a model family.

The engine (`finetune.module.FinetuneModule`, the callbacks, `finetune/run.py`) never asks which model it
trains. Everything model-specific -- what a sample must look like, loading, the objective, sampling,
evaluation, export -- sits in one subclass of `ModelFamily` per family under `recipes/`.

Required: `trainable_module`, `encode`, `training_loss`, `export`. Optional: `data_processor` (what the data
must look like, before any weights load), `cache_namespace` (encodings are computed once and cached:
`finetune/cache.py`) with `encoders` (what only encoding needs, kept off the accelerator while training reads the
cache), `generate` (validation samples), `evaluate` (metrics and per-sample rows on a validation batch),
`load_adapter` (start from or evaluate an export), `deferred_components` with `load_component`, `release_component`,
`training_components`, `validation_components`, `prompt_components` and `encode_prompts` (encoders loaded only when
a step needs them, validation prompts encoded once: `finetune.cache.EncodeOnce`), `local_checkpoint` with `trainable_module_names` (`model.path`
resolved once by `finetune.run.build`, the folder handed to `data_processor`, `trainable_module_names` and the
constructor as `checkpoint`), `export_format` with `export_formats` and `lora_names` (other LoRA file layouts: the
`cogft` command and `callbacks.export.formats`). What the `cogft` command asks besides: `merge_loras` and
`save_merged` (`cogft merge`, `cogft generate --lora`), `base_checkpoint_dir` (a merged model is not merged again),
`generation_options` and `prepare_inference` (`cogft generate`), `model_card_usage` (`cogft push`). `base_record` (what
model this is: family, variant, base checkpoint) goes into every LoRA export's record (`model_record`) and decides
whether a LoRA is applied to this model (`finetune.lora_formats.record.check_lora_fits`).
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from finetune.data import Processor


@dataclass
class GenerationRequest:
    """What to generate: a prompt and, for conditioned families, the conditioning media: `image` (image-to-video:
    a path or a PIL image) and `media`, any other named media of the request (e.g. `control_image`)."""

    prompt: str
    image: Any = None
    media: dict[str, Any] = field(default_factory=dict)
    #: the prompt's embeddings from the encoded cache (`ModelFamily.encode_prompts` of this prompt, batch of one);
    #: None: `generate` runs the text encoder itself
    embeddings: dict | None = None


@dataclass
class Sample:
    """One generated validation sample: `kind` is "video" (list of HxWx3 uint8 frames), "image" (PIL
    image) or "text" (a string); `caption` is the prompt or label shown next to it; `condition` the PIL image a
    conditioned family generated it from (image-to-video), saved and logged next to it."""

    kind: str
    data: Any
    caption: str
    fps: int = 8
    condition: Any = None


@dataclass
class Evaluation:
    """What `evaluate` found on one batch: `metrics` (means over the batch, logged as `<split>/<name>`) and
    `rows`, one dict per sample (e.g. key, label, prediction, scores) for prediction tables."""

    metrics: dict[str, float]
    rows: list[dict] = field(default_factory=list)


DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16,
          "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16}


def parse_dtype(name: str) -> torch.dtype:
    try:
        return DTYPES[str(name)]
    except KeyError:
        raise ValueError(f"model.dtype={name!r} is not supported; use one of {sorted(DTYPES)}") from None


class ModelFamily(nn.Module, ABC):
    """Model-specific code behind a small interface.

    Subclasses hold the frozen components and the trainable network as submodules, so Lightning moves them to
    the device and the engine can add adapters to them. The constructor (or a named factory) loads the model;
    its keyword arguments are the family's settings (`conf/model/<family>.yaml`).
    """

    #: default LoRA targets of the official recipe for this family
    lora_target_modules: tuple[str, ...] = ()

    #: class names of the trainable network's repeated transformer blocks: the units `strategy=fsdp2` shards (and
    #: `strategy=fsdp` wraps) and block swap streams. Empty: the network's own `_no_split_modules` (diffusers and
    #: transformers models declare them).
    block_class_names: tuple[str, ...] = ()
    #: how other tools spell the trained network's module names (`finetune.lora_formats.files.LoraNames`: native ComfyUI,
    #: SAT), for the `cogft` command and `export_format`; None: the family's own export format only
    lora_names = None
    #: the outputs of `encode` computed from the prompt alone (e.g. `prompt_embeds`): what caption dropout
    #: (`data.caption_dropout`, `finetune.dropout`) replaces by the empty prompt's; empty: captions cannot be dropped
    prompt_keys: tuple[str, ...] = ()
    #: the LoRA file formats the family writes, its own (what `export` writes) first; `callbacks.export.formats` may
    #: ask for any of them, each written by `export_format`
    export_formats: tuple[str, ...] = ()

    @classmethod
    def local_checkpoint(cls) -> str | None:
        """The local folder of `model.path` (a subclass names the settings it reads, e.g. `path`: a hub id downloaded,
        `tiny` built once, a folder checked), resolved once per run by `finetune.run.resolve_checkpoint` and handed to
        `data_processor`, `trainable_module_names` and the constructor as `checkpoint`. None: nothing to resolve.
        A subclass that names `weights` gets `weights=False` from `finetune.run.build`: a hub id then fetches only
        what those checks read (`finetune.hub.resolve_pretrained`), and the weights download into the same folder
        once every check passed (`finetune.run.fetch_weights`); without it, the whole checkpoint is fetched here."""
        return None

    @classmethod
    def data_processor(cls) -> Processor:
        """What the data must look like, from the constructor's settings it names as parameters (and `checkpoint`,
        the local folder `local_checkpoint` resolved: `finetune.run.family_data_processor`), before any weights
        load (cheap: configs and tokenizers only). Raises a clear error for settings the model cannot take."""
        return Processor()

    @classmethod
    def trainable_module_names(cls) -> dict[str, str] | None:
        """Qualified name -> class name of every submodule of the trainable network, built without weights from the
        settings it names (e.g. `checkpoint`): what `adapter.target_modules` and `adapter.modules` are checked
        against before the model loads. None: the family cannot tell before its weights load."""
        return None

    @abstractmethod
    def trainable_module(self) -> nn.Module:
        """The network that LoRA is added to or that is fully finetuned."""

    @abstractmethod
    def encode(self, batch: dict) -> dict[str, torch.Tensor]:
        """Frozen encoders: turn a batch into per-sample tensors (cacheable, no gradients)."""

    @abstractmethod
    def training_loss(self, encoded: dict[str, torch.Tensor]) -> torch.Tensor:
        """The training objective on an encoded batch (a scalar)."""

    @abstractmethod
    def export(self, directory: str | os.PathLike, adapter, record: dict | None = None) -> Path:
        """Write what `adapter` trained in the format the ecosystem loads; returns the written file or folder. A LoRA
        file keeps `self.model_record(record)` in its header (`finetune.lora_formats.files.MODEL_KEY`); `record` is
        the engine's part (recipe, global step, adapter settings, kit version: `ExportAdapter`), None outside a run."""

    def base_record(self) -> dict:
        """What model this is, for the record an export keeps and the check before a LoRA is applied
        (`finetune.lora_formats.record.check_lora_fits`): `family` (LoRAs of another family are refused), `variant`
        (e.g. "T2V 1.0", "I2V 1.5"; None: one kind only) and `base` (`record.base_identity` of the checkpoint: hub
        id and revision, or a local path and its configs' hash; None: not recorded). Default: the class name."""
        return {"family": type(self).__name__, "variant": None, "base": None}

    def model_record(self, record: dict | None = None) -> dict:
        """The record a LoRA export keeps: the engine's part `record` (without one: the kit version only) with this
        model's `base_record`."""
        from finetune.checkpointing import kit_version

        return {"recipe": None, "global_step": None, "adapter": None, "kit_version": kit_version(),
                **(record or {}), **self.base_record()}

    def cache_namespace(self) -> str | None:
        """Everything `encode` depends on besides the sample (the model and its encoders' files, dtype, sizes,
        preprocessing settings): with one, the engine encodes every training sample once before training and trains
        on the cached encodings (`module.cache`). None (the default): `encode` runs every step (a family without
        frozen encoders, whose `encode` returns the batch)."""
        return None

    def encoders(self) -> list[nn.Module]:
        """The frozen submodules (attributes of the family) that only `encode` runs, e.g. the VAE and the text
        encoder. While training reads cached encodings the engine keeps them on the CPU, out of the module tree that
        the strategy moves and wraps; it brings them to the accelerator for the precompute pass and for `generate`.
        A module `training_loss` also runs (an image-to-video VAE encoding its noisy image each step) is not one."""
        return []

    # -- encoders loaded when a step needs them (`finetune.cache.EncodeOnce`, docs/memory.md#lazy-encoders) -------
    def encoder_names(self) -> tuple[str, ...]:
        """The attribute names of `encoders()`, told without loading any of them. Default: the children that
        `encoders()` returns (a family whose constructor loads everything)."""
        encoders = self.encoders()
        return tuple(name for name, child in self._modules.items() if any(child is e for e in encoders))

    def deferred_components(self) -> tuple[str, ...]:
        """The frozen components (attribute names) the constructor did not load: each loads when first used
        (`load_component`) and may be released again (`release_component`). Default: none, all loaded."""
        return ()

    def component_loaded(self, name: str) -> bool:
        """Whether the component `name` is in memory (in the module tree, or parked out of it by the engine)."""
        return self._modules.get(name) is not None or isinstance(self.__dict__.get(name), nn.Module)

    def load_component(self, name: str) -> nn.Module:
        """Load the deferred component `name` from the checkpoint (in the family's dtype, on the device of the
        trainable network), as a child of the family (and of its pipeline); returns it."""
        raise NotImplementedError(f"{type(self).__name__} defers no component {name!r}")

    def release_component(self, name: str) -> bool:
        """Drop the loaded component `name` (the family and its pipeline keep no reference), so that its memory is
        freed; `load_component` loads it again. False: it cannot be loaded again (built in memory) and stays."""
        return False

    def training_components(self) -> dict[str, str]:
        """The deferred components `training_loss` runs itself, each with why (an image-to-video VAE encoding its
        noisy image each step): loaded before the strategy moves the module, for the whole run. Default: none."""
        return {}

    def validation_components(self, prompts_cached: bool) -> tuple[str, ...]:
        """The components `generate` runs: with `prompts_cached` (every request carries its `embeddings`) the text
        encoder is not among them. Default: `encoder_names()`."""
        return self.encoder_names()

    def prompt_components(self) -> tuple[str, ...]:
        """The components `encode_prompts` runs (the text encoder); () (the default): the family does not encode
        validation prompts ahead, its `generate` encodes them."""
        return ()

    def encode_prompts(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        """What `generate` needs of each prompt (its embeddings and the negative prompt's), batch first: cached
        like the samples' encodings, and given back to `generate` as `GenerationRequest.embeddings`."""
        raise NotImplementedError(f"{type(self).__name__} does not encode prompts ahead of generate")

    def generate(self, requests: list[GenerationRequest], seed: int, **kwargs) -> list[Sample]:
        """Validation samples from the current weights; request i uses seed + i."""
        return []

    def evaluate(self, batch: dict) -> Evaluation:
        """Metrics and per-sample rows on a batch of the validation or test split."""
        return Evaluation(metrics={})

    def export_format(self, directory: str | os.PathLike, adapter, fmt: str, record: dict | None = None) -> Path:
        """Write what `adapter` trained as `fmt` (one of `export_formats` after the first) next to `export`'s file,
        with `model_record(record)` in its header as `export` does; returns the written file."""
        raise ValueError(f"{type(self).__name__} writes no {fmt!r} files; callbacks.export.formats takes "
                         f"{list(self.export_formats) or 'nothing but its own export'}.")

    def load_adapter(self, path: str | os.PathLike, adapter) -> None:
        """Load what `export` wrote for `adapter` into the trainable network (`adapter_path=DIR`)."""
        raise NotImplementedError(f"{type(self).__name__} cannot load an exported adapter (adapter_path); "
                                  f"evaluate a training checkpoint with ckpt_path instead")

    # -- what the `cogft` command asks (merge, generate, push) ----------------------------------------
    def merge_loras(self, loras: list[tuple[str, float]], blend_full_modules: bool = False) -> list[dict]:
        """Fold each LoRA (a file or export folder in a format the family reads, with its scale) into the base
        weights, in order; returns one record per LoRA (its path and scale, and what was read: layout, rank,
        alpha) for `cogft_merge.json`. The scale s multiplies the LoRA update (`W + s * alpha / rank * B @ A`); the
        fully trained modules an adapter carries (PEFT's `modules_to_save`) replace the base's at full strength,
        or with `blend_full_modules` become `W_base + s * (W_trained - W_base)`."""
        raise NotImplementedError(f"{type(self).__name__} cannot merge LoRAs into its base model (cogft merge, "
                                  f"cogft generate --lora): the family implements no merge_loras.")

    @classmethod
    def recognize_lora(cls, shapes: dict[str, tuple[int, ...]]) -> str | None:
        """What model a LoRA file is for, from its tensor names and shapes alone (`cogft inspect` without `--family`):
        a short description (e.g. "CogVideoX-5B or CogVideoX1.5-5B") when they are this family's, None otherwise, or
        when they could be another family's too (the command says "unknown" rather than guess)."""
        return None

    @classmethod
    def captioner(cls, model: str, **options):
        """A captioner for `model` (a hub id, a local folder or `tiny`) when this family makes captions with it, else
        None (the default). `cogft caption` asks every family (`finetune.families.captioner`). The object has
        `caption_videos(paths)` and `caption_images(paths)` (lists of captions, in order; `NotImplementedError` for a
        kind it cannot caption) and `describe(kind)`, the model it uses for "video" or "image". options: video_model,
        image_model, dtype, quantize, device, prompt, max_new_tokens, batch_size."""
        return None

    def save_merged(self, directory: str | os.PathLike) -> Path:
        """Save the whole model (LoRAs merged) so that its library's `from_pretrained(directory)` loads it and the
        recipe takes it as `model.path`; returns the folder."""
        raise NotImplementedError(f"{type(self).__name__} cannot save a merged model (cogft merge): the family "
                                  f"implements no save_merged.")

    def base_checkpoint_dir(self) -> Path | None:
        """The local folder the base weights were loaded from (None: built in memory), where `cogft merge` looks
        for the record of an earlier merge."""
        raise NotImplementedError(f"{type(self).__name__} does not say which folder it loaded (cogft merge): the "
                                  f"family implements no base_checkpoint_dir.")

    def generation_options(self) -> tuple[str, ...]:
        """The keyword options `generate` takes (`num_inference_steps`, `guidance_scale`, `fps`): `cogft generate`
        passes those of its options that are set and named here. Default: none."""
        return ()

    def prepare_inference(self) -> None:
        """Ready for the `cogft generate` command: eval mode, progress shown (training hides it)."""
        self.eval()

    @classmethod
    def model_card_usage(cls, base: str, repo_id: str, files: list[str]) -> list[str] | None:
        """The "Use it" lines (markdown) of the model card `cogft push` writes for an export holding `files`, loaded
        on top of `base` from `repo_id`; None (the default): the command's generic lines."""
        return None

    def enable_gradient_checkpointing(self) -> None:
        module = self.trainable_module()
        if hasattr(module, "enable_gradient_checkpointing"):
            module.enable_gradient_checkpointing()
        else:
            module.gradient_checkpointing_enable()

    def transformer_blocks(self) -> list[nn.Module]:
        """The trainable network's transformer blocks (`block_class_names`), in execution order."""
        network = self.trainable_module()
        names = set(self.block_class_names or getattr(network, "_no_split_modules", None) or ())
        return [module for module in network.modules() if type(module).__name__ in names]

    def on_train_mode(self) -> None:
        """Keep frozen parts in eval mode (dropout off) whatever Lightning does with `train()`."""
        self.eval()
        self.trainable_module().train()
