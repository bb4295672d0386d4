"""What every diffusers-pipeline family shares: the transformer is the trained network, LoRAs are
exported with the pipeline's own `save_lora_weights` (keys `transformer.*`, rank/alpha/targets in the
header's `lora_adapter_metadata`, so `load_lora_weights` restores the trained strength), full finetunes
are saved as the transformer in diffusers layout, exports load back as a starting point (`adapter_path`),
and validation samples come from the pipeline itself, one request at a time."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import nn

from finetune.adapters import LoRA
from finetune.cache import files_fingerprint
from finetune.family import GenerationRequest, ModelFamily, Sample
from finetune.errors import PathSettingError
from finetune.lora_formats.files import LoraFileError, LoraNames
from finetune.settings.check import ConfigError

LORA_FILE = "pytorch_lora_weights.safetensors"


def base_quantization(quantize_base: str | None, compute_dtype: torch.dtype):
    """`model.quantize_base`: null (the base transformer in `model.dtype`) or `nf4` (QLoRA: its linear layers stored
    as 4-bit NormalFloat by bitsandbytes, dequantized to `compute_dtype` layer by layer; the LoRA stays fp32). The
    transformer's diffusers `BitsAndBytesConfig`, or None; checked before any weight loads."""
    if quantize_base is None:
        return None
    if quantize_base != "nf4":
        raise ConfigError(f"model.quantize_base={quantize_base!r}: use nf4 (QLoRA: a 4-bit NormalFloat base through "
                         f"bitsandbytes) or null (the base in model.dtype).")
    if not torch.cuda.is_available():
        raise RuntimeError("model.quantize_base=nf4 (QLoRA) needs a CUDA GPU: diffusers quantizes with bitsandbytes "
                           "on the GPU. On this machine set model.quantize_base=null.")
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise ImportError("model.quantize_base=nf4 (QLoRA) needs bitsandbytes, which is not installed: "
                          "pip install -e '.[memory]'") from None
    from diffusers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute_dtype)


#: the frozen components of a diffusers family that only encoding and sampling run
ENCODERS = ("vae", "text_encoder")
#: those `load_pipeline` leaves unloaded, each loaded when a step runs it (docs/memory.md#lazy-encoders); () loads
#: every component with the pipeline
DEFERRED = ENCODERS


def component_class(directory: str, name: str):
    """The class `model_index.json` of `directory` names for the component `name` (diffusers or transformers)."""
    import importlib

    library, class_name = json.loads((Path(directory) / "model_index.json").read_text())[name]
    return getattr(importlib.import_module(library), class_name)


def placeholder(directory: str, name: str) -> nn.Module | None:
    """The component `name` of `directory` built from its config on the meta device (no weights read, no memory):
    what the pipeline's constructor reads of it (the VAE's scale factors) and what the family reads of its config,
    without loading it. None for a transformers component (the pipelines read nothing of the text encoder)."""
    cls = component_class(directory, name)
    if not hasattr(cls, "from_config"):
        return None
    with torch.device("meta"):
        return cls.from_config(cls.load_config(Path(directory) / name))


def load_pipeline(pipeline_class: str, directory: str, dtype: torch.dtype, quantization=None,
                  deferred: tuple[str, ...] | None = None):
    """`pipeline_class.from_pretrained(directory)` in `dtype`, without loading the components named in `deferred`
    (meta-device placeholders: `DiffusersFamily.attach_pipeline` loads them when a step needs them); with
    `quantization` (`base_quantization`) the transformer is loaded quantized (onto the current CUDA device).

    The transformer loads in `dtype` with diffusers' `low_cpu_mem_usage` (its default with accelerate): the weights
    are read into an empty model, no fp32 copy is made on the host. It loads to the CPU: the Lightning strategy
    moves it to this rank's device (under ddp_spawn a rank's device is not known while the model is built)."""
    import diffusers

    pipeline = getattr(diffusers, pipeline_class)
    skipped = {name: placeholder(directory, name) for name in (DEFERRED if deferred is None else deferred)}
    if quantization is None:
        return pipeline.from_pretrained(directory, dtype=dtype, **skipped)
    config = json.loads((Path(directory) / "transformer" / "config.json").read_text())
    transformer = getattr(diffusers, config["_class_name"]).from_pretrained(
        directory, subfolder="transformer", quantization_config=quantization, dtype=dtype)
    return pipeline.from_pretrained(directory, transformer=transformer, dtype=dtype, **skipped)


def _on_meta(module) -> bool:
    return any(p.is_meta for p in module.parameters())


class DiffusersFamily(ModelFamily):
    """Subclasses call `attach_pipeline(pipe)` with the loaded diffusers pipeline and implement
    `generate_one`. The VAE and the text encoder load when first used (`load_pipeline` defers them,
    `load_component`), so a run that trains from a warm encoded cache never loads them (docs/memory.md#lazy-encoders);
    `pipe` is the pipeline with everything loaded, `pipeline` as loaded so far."""

    prompt_keys = ("prompt_embeds",)  # what `encode` makes of the prompt (caption dropout replaces it)

    def attach_pipeline(self, pipe) -> None:
        self.pipeline = pipe
        pipe.set_progress_bar_config(disable=True)
        # nn.Module attributes so Lightning moves and checkpoints them; the pipeline shares them. The deferred
        # components (`load_pipeline`: meta placeholders or None) load when first used (`load_component`).
        # A subclass may attach another pipeline class built from `pipeline_components()` (CogView4 control): what
        # the first attach learnt of the deferred components (their classes, meta placeholders) is kept.
        self.transformer = pipe.transformer
        previous = self.__dict__.get("component_placeholders", {}), self.__dict__.get("component_classes", {})
        self.component_placeholders, self.component_classes = {}, {}
        for name in ENCODERS:
            module = getattr(pipe, name, None)
            if module is not None and not _on_meta(module):
                setattr(self, name, module)  # built in memory or loaded eagerly
                continue
            placeholder_module = module if module is not None else previous[0].get(name)
            if placeholder_module is not None:
                self.component_placeholders[name] = placeholder_module
            if name in previous[1]:
                self.component_classes[name] = previous[1][name]
            elif getattr(self, "checkpoint_dir", None):
                self.component_classes[name] = component_class(self.checkpoint_dir, name)
            pipe.register_modules(**{name: None})
        self.requires_grad_(False)

    def pipeline_components(self) -> dict:
        """The pipeline's components, each deferred one not loaded yet as its meta placeholder (no memory): what a
        subclass passes to another pipeline class (`CogView4ControlPipeline(**family.pipeline_components())`) before
        `attach_pipeline`, so that the new pipeline reads the right VAE scale factors and nothing loads."""
        components = dict(self.pipeline.components)
        for name, module in self.component_placeholders.items():
            if components.get(name) is None:
                components[name] = module
        return components

    @property
    def pipe(self):
        """The diffusers pipeline with every component loaded (deferred ones load now): for code that runs the
        pipeline as a whole. The family's own code uses `self.pipeline`, whose deferred components load only when a
        step needs them (`load_component`)."""
        for name in self.deferred_components():
            getattr(self, name)
        return self.pipeline

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            # `self.vae`, `self.text_encoder` before they loaded: load now (code outside the engine, `cogft`)
            if name in ENCODERS and name in self.__dict__.get("component_classes", {}):
                return self.load_component(name)
            raise

    def deferred_components(self) -> tuple[str, ...]:
        return tuple(name for name in ENCODERS if name in self.component_classes)

    def component_config(self, name: str):
        """The config of the component `name` (e.g. the VAE's scaling factor), without loading it."""
        if self.component_loaded(name):
            return getattr(self, name).config
        return self.component_placeholders[name].config

    def load_component(self, name: str) -> nn.Module:
        """`name` from `checkpoint_dir/name` as `Pipeline.from_pretrained` loads it (the class `model_index.json`
        names, the family's dtype), frozen, on the transformer's device, a child of the family and the pipeline."""
        if self.component_loaded(name):
            return getattr(self, name)
        cls = self.component_classes[name]
        module = cls.from_pretrained(str(Path(self.checkpoint_dir) / name), dtype=self.component_dtype)
        module.requires_grad_(False).eval()
        module.to(next(self.transformer.parameters()).device)
        self.configure_component(name, module)
        setattr(self, name, module)
        self.pipeline.register_modules(**{name: module})
        return module

    def configure_component(self, name: str, module: nn.Module) -> None:
        """A family's settings applied to a component just loaded (CogVideoX: VAE tiling)."""

    def release_component(self, name: str) -> bool:
        if name not in self.component_classes or not self.component_loaded(name):
            return False
        self._modules.pop(name, None)
        self.__dict__.pop(name, None)
        self.pipeline.register_modules(**{name: None})
        return True

    @property
    def component_dtype(self) -> torch.dtype:
        from finetune.family import parse_dtype

        return parse_dtype(self.dtype_name)

    def validation_components(self, prompts_cached: bool) -> tuple[str, ...]:
        """The VAE (its decoder draws the sample), and the text encoder for prompts not in the cache."""
        return ("vae",) if prompts_cached else ("vae", "text_encoder")

    def prompt_components(self) -> tuple[str, ...]:
        return ("text_encoder",)

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        """The pipeline's own `encode_prompt` as its `__call__` runs it (no negative prompt, guidance on): the
        prompt's and the empty negative prompt's embeddings, so a sample from them is the sample from the prompt."""
        positive, negative = self.pipeline.encode_prompt(
            list(prompts), negative_prompt=None, do_classifier_free_guidance=True,
            max_sequence_length=self.max_sequence_length, device=self.text_encoder.device)
        return {"prompt_embeds": positive, "negative_prompt_embeds": negative}

    def prompt_arguments(self, request: GenerationRequest) -> dict:
        """The pipeline's prompt arguments for `request`: its cached embeddings when it carries them, else the
        prompt (the pipeline runs the text encoder)."""
        if request.embeddings is None:
            return {"prompt": request.prompt}
        device = next(self.transformer.parameters()).device
        return {name: request.embeddings[name].to(device) for name in ("prompt_embeds", "negative_prompt_embeds")}

    @property
    def transformer_dtype(self) -> torch.dtype:
        """`self.transformer.dtype` (what its inputs are cast to), read again only when the first parameter's dtype or
        device changes (a cast, a move, layerwise casting): diffusers' `.dtype` walks every submodule on each call,
        0.8 ms of a tiny model's 9 ms training step."""
        first = next(self.transformer.parameters())
        if getattr(self, "_dtype_seen", None) != (first.dtype, first.device):
            self._transformer_dtype = self.transformer.dtype
            self._dtype_seen = (first.dtype, first.device)
        return self._transformer_dtype

    def trainable_module(self) -> nn.Module:
        return self.transformer

    #: the local checkpoint folder the pipeline was loaded from (None: components built in memory)
    checkpoint_dir: str | None = None

    def encoders(self) -> list[nn.Module]:
        """The VAE and the text encoder: with cached encodings training runs neither (validation samples do)."""
        return [getattr(self, name) for name in self.encoder_names()]

    def encoder_names(self) -> tuple[str, ...]:
        return ("vae", "text_encoder")

    def encoder_files(self) -> str:
        """The encoders' files in the checkpoint (VAE, text encoder, tokenizer) as a digest, for `cache_namespace`:
        a rebuilt tiny model or another snapshot under the same path is another model."""
        return files_fingerprint(self.checkpoint_dir, ("model_index.json", "vae", "text_encoder", "tokenizer"))

    @classmethod
    def trainable_module_names(cls, checkpoint: str) -> dict[str, str]:
        """Qualified name -> class name of every submodule of the transformer, built from `transformer/config.json`
        of `checkpoint` (the local folder, the family's `local_checkpoint`) on the meta device (no weights read, no
        memory; 0.1 s at 5B): what `adapter.target_modules` and `adapter.modules` must match, checked before the
        model loads (`finetune.settings.check.check_trainable_modules`). The class is `transformer_class` or the one
        `model_index.json` names."""
        import diffusers

        local = Path(checkpoint)
        class_name = getattr(cls, "transformer_class", None) or \
            json.loads((local / "model_index.json").read_text())["transformer"][-1]
        transformer_class = getattr(diffusers, class_name)
        with torch.device("meta"):
            transformer = transformer_class.from_config(transformer_class.load_config(local / "transformer"))
        return {name: type(module).__name__ for name, module in transformer.named_modules() if name}

    # -- export and reload ------------------------------------------------------------------------
    def export(self, directory: str | os.PathLike, adapter, record: dict | None = None) -> Path:
        """LoRA: `pytorch_lora_weights.safetensors` for `pipe.load_lora_weights(dir)`, its header keeping the model
        record; full finetune: the transformer in diffusers layout (`transformer/`)."""
        if isinstance(adapter, LoRA):
            return self.write_lora_weights(directory, adapter.adapter_name, self.model_record(record))
        return self.write_transformer(directory)

    #: what `base_record` calls the family and this class's variant of it (None: the family has one kind)
    base_family: str = "diffusers"
    base_variant: str | None = None

    def base_record(self) -> dict:
        """`base_family`, `base_variant` and the checkpoint `path` was loaded from (`base_identity`)."""
        from finetune.lora_formats.record import base_identity

        return {"family": self.base_family, "variant": self.base_variant,
                "base": base_identity(self.path, self.checkpoint_dir)}

    def lora_state(self, adapter_name: str) -> tuple[dict[str, torch.Tensor], dict]:
        """The adapter's tensors (peft key names, on CPU) and its settings (rank, alpha, targets)."""
        from peft.utils import get_peft_model_state_dict

        from finetune.strategies import refuse_incomplete

        state = get_peft_model_state_dict(self.transformer, adapter_name=adapter_name)
        refuse_incomplete(state, f"the LoRA {adapter_name!r} of {type(self).__name__}")  # ZeRO-3/FSDP2, ungathered
        state = {k: v.detach().to("cpu").contiguous() for k, v in state.items()}
        return state, self.transformer.peft_config[adapter_name].to_dict()

    def write_lora_weights(self, directory: str | os.PathLike, adapter_name: str = "default",
                           model: dict | None = None) -> Path:
        """The keys and file name `pipe.save_lora_weights` writes, with alpha/rank folded into lora_B and a header of
        the fields every supported peft takes (alpha = rank), the trained rank and alpha kept beside it: diffusers
        0.33 (which ignores the header), 0.34+ with any peft >= the kit's pin, ComfyUI-CogVideoXWrapper and PEFT all
        apply the trained update at strength 1 (docs/lora-formats.md#the-default-export; `bench/compat.py`)."""
        from finetune.lora_formats.files import from_peft_state
        from finetune.lora_formats.writing import write_adapter

        state, config = self.lora_state(adapter_name)
        return write_adapter(from_peft_state(state, config), Path(directory) / LORA_FILE, "diffusers",
                             self.lora_names, fold=True, targets=sorted(config["target_modules"]), model=model)

    def write_transformer(self, directory: str | os.PathLike) -> Path:
        """The transformer in the checkpoint's layout (`transformer/`): pass it to
        `Pipeline.from_pretrained(base, transformer=TransformerClass.from_pretrained(dir))`."""
        path = Path(directory) / "transformer"
        self.transformer.save_pretrained(path)
        return path

    def load_adapter(self, path: str | os.PathLike, adapter) -> None:
        """A LoRA export into the recipe's adapter (rank, alpha and targets must match), or a full-finetune
        export's transformer weights into the transformer."""
        path = Path(path)
        if isinstance(adapter, LoRA):
            file = next((f for f in (path / self.lora_file_name(), path) if f.is_file()), None)
            if file is None:
                raise PathSettingError(f"adapter_path={str(path)!r} has no {self.lora_file_name()}: pass the "
                                        f"export folder of a LoRA run of this recipe (run_dir/export).")
            self.load_lora_file(file, adapter.adapter_name)
        else:
            from diffusers.models.model_loading_utils import load_state_dict

            weights = path / "transformer" / "diffusion_pytorch_model.safetensors"
            if not weights.is_file():
                raise PathSettingError(f"adapter_path={str(path)!r} has no {weights.relative_to(path)}: pass the "
                                        f"export folder of a full-finetune run (adapter=full) of this recipe.")
            result = self.transformer.load_state_dict(load_state_dict(str(weights)), strict=False)
            if result.missing_keys or result.unexpected_keys:
                raise ValueError(f"{weights} does not fit this transformer ({len(result.missing_keys)} missing, "
                                 f"{len(result.unexpected_keys)} unexpected tensors): it was exported from another "
                                 f"model.")

    def lora_file_name(self) -> str:
        return LORA_FILE

    # -- other LoRA formats and merging (the `cogft` command) -------------------------------------
    lora_names = LoraNames()  # `transformer.`-prefixed keys; a family that native ComfyUI runs adds its names
    export_formats = ("diffusers",)

    def export_format(self, directory: str | os.PathLike, adapter, fmt: str, record: dict | None = None) -> Path:
        """The trained LoRA as `fmt` (`finetune.lora_formats.writing.FORMATS`: comfy, kohya) beside the diffusers file."""
        from finetune.lora_formats.files import from_peft_state
        from finetune.lora_formats.writing import write_adapter

        if fmt not in self.export_formats or not isinstance(adapter, LoRA):
            return super().export_format(directory, adapter, fmt, record)
        state, config = self.lora_state(adapter.adapter_name)
        return write_adapter(from_peft_state(state, config), directory, fmt, self.lora_names,
                             model=self.model_record(record))

    def merge_loras(self, loras: list[tuple[str, float]], blend_full_modules: bool = False) -> list[dict]:
        """Each LoRA file or folder (any layout `cogft inspect` knows, read with `lora_names`) at its scale into the
        transformer (`merge_adapters`); every file is read and checked for NaN/inf before any weight changes. These
        files hold LoRA pairs only, so `blend_full_modules` changes nothing here."""
        from finetune.lora_formats.files import check_finite, read_lora_file, to_adapter

        adapters, record = [], []
        for path, scale in loras:
            adapter = to_adapter(read_lora_file(path), self.lora_names)
            check_finite({f"{n}.{p}": t for n, m in adapter.modules.items() for p, t in (("A", m.A), ("B", m.B))},
                         str(path))
            adapters.append((adapter, scale))
            record.append({"path": str(path), "scale": scale, "layout": adapter.layout,
                           "rank": sorted(adapter.ranks()), "alpha": sorted(adapter.alphas())})
        self.merge_adapters(adapters)
        return record

    @torch.no_grad()
    def merge_adapters(self, loras: list) -> None:
        """`W += scale * alpha / rank * B @ A` into the transformer for each `(finetune.lora_formats.files.Adapter, scale)`,
        in fp32, each weight keeping its dtype."""
        for adapter, scale in loras:
            for name, module in adapter.modules.items():
                try:
                    weight = self.transformer.get_submodule(name).weight
                except AttributeError:
                    raise ValueError(f"the LoRA targets {name!r}, which this {type(self).__name__} transformer "
                                     f"does not have: it was trained for another model.") from None
                delta = module.delta().reshape(weight.shape).to(weight.device)
                weight.copy_((weight.float() + scale * delta).to(weight.dtype))

    def save_merged(self, directory: str | os.PathLike) -> Path:
        """The whole pipeline in diffusers layout (`Pipeline.from_pretrained(directory)`)."""
        self.pipe.save_pretrained(directory)
        return Path(directory)

    def base_checkpoint_dir(self) -> Path | None:
        return Path(self.checkpoint_dir) if self.checkpoint_dir else None

    #: the diffusers pipeline class the model card loads the LoRA with (None: `DiffusionPipeline`)
    pipeline_class: str | None = None

    @classmethod
    def model_card_usage(cls, base: str, repo_id: str, files: list[str]) -> list[str] | None:
        """diffusers' `load_lora_weights` (the metadata restores the trained strength) and, for a model native
        ComfyUI runs (`lora_names.modules`), how ComfyUI loads it. A PEFT folder: the command's generic lines."""
        if "adapter_config.json" in files:
            return None
        pipeline = cls.pipeline_class or "DiffusionPipeline"
        lines = ["diffusers (rank and alpha are in the file's metadata: it loads at the trained strength):", "",
                 "```python", "import torch", f"from diffusers import {pipeline}", "",
                 f'pipe = {pipeline}.from_pretrained("{base}", torch_dtype=torch.bfloat16)',
                 f'pipe.load_lora_weights("{repo_id}", weight_name="pytorch_lora_weights.safetensors", '
                 f'adapter_name="lora")', "```", ""]
        if cls.lora_names.modules is None:
            return lines
        lines += ["ComfyUI:", ""]
        if "comfyui_lora.safetensors" in files:
            lines.append("- native ComfyUI: put `comfyui_lora.safetensors` (native module names, per-module `.alpha`) "
                         "into `models/loras/` and load it with *LoraLoaderModelOnly* at strength 1.0.")
        else:
            lines.append("- native ComfyUI reads neither diffusers' key names nor its metadata: convert first with "
                         "`cogft convert pytorch_lora_weights.safetensors comfyui_lora.safetensors --to comfy`.")
        return lines + ["- ComfyUI-CogVideoXWrapper: `pytorch_lora_weights.safetensors` (it loads through diffusers, "
                        "which reads the metadata), strength 1.0.", ""]

    def load_lora_file(self, file: Path, adapter_name: str) -> None:
        """A safetensors LoRA with `transformer.`-prefixed peft keys and `lora_adapter_metadata`."""
        from peft.utils import set_peft_model_state_dict
        from safetensors import safe_open

        from finetune.lora_formats.files import trained_record
        from finetune.lora_formats.writing import unfold_alpha

        with safe_open(str(file), framework="pt") as f:
            raw = f.metadata() or {}
            header = json.loads(raw.get("lora_adapter_metadata", "{}"))
            metadata = {k.removeprefix("transformer."): v for k, v in header.items()}  # diffusers prefixes them
            state = {k.removeprefix("transformer."): f.get_tensor(k) for k in f.keys()}
        record = trained_record(raw)
        if record is not None:  # the kit's folded export: the trained alpha, and lora_B as trained
            metadata["lora_alpha"] = record["alpha"]
            state = unfold_alpha(state, record, int(metadata.get("r", record["rank"])))
        current = self.transformer.peft_config[adapter_name]
        differ = [f"{option}={metadata[name]}" for name, option in
                  (("r", "adapter.rank"), ("lora_alpha", "adapter.alpha"), ("target_modules", "adapter.target_modules"))
                  if name in metadata and _normal(metadata[name]) != _normal(getattr(current, name))]
        if differ:
            raise LoraFileError(f"the LoRA in {file} was trained with other settings; pass {' '.join(differ)}.")
        result = set_peft_model_state_dict(self.transformer, state, adapter_name=adapter_name)
        if result.unexpected_keys:
            raise LoraFileError(f"{file}: {len(result.unexpected_keys)} tensors fit no module, e.g. "
                             f"{result.unexpected_keys[0]}; it was exported from another model.")

    # -- validation samples -----------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, requests: list[GenerationRequest], seed: int, **kwargs) -> list[Sample]:
        """One sample per request with the pipeline; request i draws from a CPU generator seeded seed + i."""
        cached = all(request.embeddings is not None for request in requests)
        for name in self.validation_components(cached):
            getattr(self, name)  # loaded now if it was not (outside the engine, which loads them itself)
        return [self.generate_one(request, torch.Generator(device="cpu").manual_seed(seed + i), **kwargs)
                for i, request in enumerate(requests)]

    def generate_one(self, request: GenerationRequest, generator: torch.Generator, **kwargs) -> Sample:
        raise NotImplementedError

    def generation_options(self) -> tuple[str, ...]:
        """The keyword options of the family's `generate_one` (steps, guidance scale, fps)."""
        import inspect

        parameters = list(inspect.signature(self.generate_one).parameters.values())[2:]  # after request, generator
        return tuple(p.name for p in parameters if p.kind is p.POSITIONAL_OR_KEYWORD or p.kind is p.KEYWORD_ONLY)

    def prepare_inference(self) -> None:
        """Eval mode, and the denoising steps' progress bar shown (the kit hides it during training)."""
        super().prepare_inference()
        self.pipeline.set_progress_bar_config(disable=False)

    def generate_image(self, request: GenerationRequest, generator: torch.Generator,
                       num_inference_steps: int = 50, guidance_scale: float = 5.0) -> Sample:
        """An image at `self.height` x `self.width` (text-to-image families)."""
        image = self.pipeline(**self.prompt_arguments(request), height=self.height, width=self.width,
                          max_sequence_length=self.max_sequence_length, generator=generator,
                          num_inference_steps=num_inference_steps, guidance_scale=guidance_scale).images[0]
        return Sample("image", image, request.prompt)


def _normal(value):
    if isinstance(value, (list, tuple, set)):
        return sorted(value)
    return value
