"""CogVLM as a model family: loading, the captioning loss, exact-match evaluation, PEFT and merged export.

Objective: next-token cross-entropy on the answer tokens and EOS only (labels -100 elsewhere, built by
`prompting.build_conversation_input_ids`), as the official captcha finetune (THUDM/CogVLM `finetune_demo/
finetune_cogvlm_demo.py`, `forward_step`). Evaluation: greedy decoding of the prompt (transformers' `generate`),
then `acc` (exact match) and `acc_w/o_case` (case-insensitive), the metrics of its `forward_step_eval`, on
whitespace-stripped strings, and `cer` (character error rate: edit distance / label length), which shows progress
before whole answers are right.
The same family serves CogVLM2 (`conf/model/cogvlm2.yaml`): its differences live in the checkpoint's config.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import json
import os
from pathlib import Path

import torch
from torch import nn

from finetune.adapters import LoRA, merged_state_dict
from finetune.settings.check import ConfigError
from finetune.family import Evaluation, GenerationRequest, ModelFamily, Sample, parse_dtype
from finetune.hub import resolve_pretrained

from .configuration_cogvlm import CogVLMConfig
from .modeling_cogvlm import CogVLMForCausalLM
from .prompting import CogVLMProcessor
from .tokenizer import load_tokenizer
from .tiny import save_tiny_cogvlm, tiny_cogvlm_config

# Names for `model.lora_targets` -> peft target names (a module matches when its qualified name ends with one).
LORA_TARGETS: dict[str, tuple[str, ...]] = {
    "language_expert_attention": ("language_expert_query_key_value", "language_expert_dense"),
    "vision_expert_attention": ("vision_expert_query_key_value", "vision_expert_dense"),
    "language_expert_mlp": ("language_mlp.gate_proj", "language_mlp.up_proj", "language_mlp.down_proj"),
    "vision_expert_mlp": ("vision_mlp.gate_proj", "vision_mlp.up_proj", "vision_mlp.down_proj"),
    "vit_attention": ("attention.query_key_value", "attention.dense"),
    "vit_mlp": ("mlp.fc1", "mlp.fc2"),
    "vision_adapter": ("linear_proj.linear_proj", "linear_proj.dense_h_to_4h", "linear_proj.gate_proj",
                       "linear_proj.dense_4h_to_h"),
}


def lora_target_modules(names) -> tuple[str, ...]:
    unknown = [name for name in names if name not in LORA_TARGETS]
    if unknown or not names:
        raise ConfigError(f"model.lora_targets={list(names)}: unknown {unknown or 'empty list'}; use some of "
                         f"{sorted(LORA_TARGETS)}.")
    return tuple(target for name in names for target in LORA_TARGETS[name])


TINY_KEYS = {"seed", "cogvlm2", "image_size"}  # besides CogVLMConfig's fields: tiny_cogvlm_config's own arguments


def _plain(value):
    """A Hydra/OmegaConf node as plain dicts and lists (hashable through JSON)."""
    if hasattr(value, "items"):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)) or type(value).__name__ == "ListConfig":
        return [_plain(v) for v in value]
    return value


def resolve_model(path: str, tiny: dict | None = None, weights: bool = True) -> str:
    """The local checkpoint folder of `model.path`. For `tiny`, the tiny model built with the `model.tiny` settings
    (`recipes/cogvlm/tiny.py`), cached per settings: `cogvlm` without any, `cogvlm-<hash of the settings>` with."""
    tiny = _plain(tiny or {})
    unknown = sorted(set(tiny) - TINY_KEYS - set(CogVLMConfig.__dataclass_fields__))
    if unknown:
        raise ConfigError(f"model.tiny has unknown keys {unknown}: use tiny_cogvlm_config's arguments "
                         f"({', '.join(sorted(TINY_KEYS))}) or CogVLMConfig fields, "
                         f"e.g. model.tiny.initializer_range=0.1")
    family = "cogvlm"
    if path == "tiny" and tiny:
        tiny_cogvlm_config(**{k: v for k, v in tiny.items() if k != "seed"})  # bad values fail here, before building
        family += "-" + hashlib.sha1(json.dumps(tiny, sort_keys=True).encode()).hexdigest()[:10]
    return resolve_pretrained(path, family=family, build_tiny=functools.partial(save_tiny_cogvlm, **tiny),
                              marker="config.json", weights=weights)


def decode_answers(tokenizer, new_tokens: torch.Tensor) -> list[str]:
    return [text.strip() for text in tokenizer.batch_decode(new_tokens, skip_special_tokens=True)]


@torch.no_grad()
def generate_answers(model, tokenizer, input_ids, images, token_type_ids, attention_mask,
                     max_new_tokens: int = 10) -> list[str]:
    """Greedy decoding with transformers' `generate` (KV cache, left-padded batch): the answers as text."""
    output = model.generate(input_ids=input_ids, images=images, token_type_ids=token_type_ids,
                            attention_mask=attention_mask, max_new_tokens=max_new_tokens, do_sample=False,
                            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    return decode_answers(tokenizer, output[:, input_ids.shape[1]:])


@torch.no_grad()
def predict_images(network, processor: CogVLMProcessor, images: list, max_new_tokens: int = 10) -> list[str]:
    """Greedy answers to the processor's prompt about each PIL image, decoded by transformers' `generate` as the
    recipe's evaluation decodes."""
    batch = {k: v.to(network.device) for k, v in processor.prompt_batch(images).items()}
    dtype = next(network.parameters()).dtype
    return generate_answers(network, processor.tokenizer, batch["input_ids"], batch["images"].to(dtype),
                            batch["token_type_ids"], batch["attention_mask"], max_new_tokens)


def edit_distance(a: str, b: str) -> int:
    """Levenshtein distance: the fewest single-character insertions, deletions and substitutions from a to b."""
    previous = list(range(len(b) + 1))
    for i, char_a in enumerate(a, 1):
        current = [i]
        for j, char_b in enumerate(b, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (char_a != char_b)))
        previous = current
    return previous[-1]


def exact_match(predictions: list[str], labels: list[str]) -> dict[str, list[float]]:
    """Per-sample `acc` (exact), `acc_w/o_case` (case-insensitive) and `cer` (character error rate: edit distance
    over the label's length, so 0 is perfect and an empty or wholly wrong answer is 1 or more) on
    whitespace-stripped strings."""
    pairs = [(p.strip(), t.strip()) for p, t in zip(predictions, labels, strict=True)]
    return {"acc": [float(p == t) for p, t in pairs], "acc_w/o_case": [float(p.lower() == t.lower()) for p, t in pairs],
            "cer": [edit_distance(p, t) / max(len(t), 1) for p, t in pairs]}



def _saved(parameter: str, modules_to_save: list[str]) -> bool:
    """Whether a parameter lies in one of PEFT's `modules_to_save` (a module whose name is, or ends with, an entry)."""
    parts = parameter.split(".")[:-1]
    names = {".".join(parts[:i]) for i in range(1, len(parts) + 1)}
    return any(name == entry or name.endswith("." + entry) for name in names for entry in modules_to_save)


class CogVLM(ModelFamily):
    """CogVLM (THUDM/cogvlm-base-490-hf, -base-224-hf, -chat-hf) and CogVLM2 (THUDM/cogvlm2-llama3-chat-19B) on the
    native model of `recipes.cogvlm`.

    Args:
        path: hub id, a local checkpoint folder (config.json + safetensors), or `tiny`.
        tokenizer_path: used when the model folder has no tokenizer (the THUDM/cogvlm-*-hf repos have none; the
            CogVLM2 ones do: null).
        dtype: weights of the base model (bf16 as the official finetune); trainable weights stay fp32.
        lora_targets: what LoRA adapts, by name (`LORA_TARGETS`); the official recipe: language expert attention
            and ViT attention. Used when `adapter.target_modules` is null.
        max_new_tokens: greedy decoding budget in evaluation (captcha labels: 4-6 characters + EOS).
        prompt: the query put after the image; the answer to learn is the sample's label ("CAPTCHA:" officially).
        template_version: base, chat or vqa; null takes the checkpoint's (base for cogvlm-base-490-hf).
        tiny: with path=tiny, the tiny model's settings (`recipes/cogvlm/tiny.py` `tiny_cogvlm_config`: cogvlm2,
            image_size, or any CogVLMConfig field such as initializer_range); each set of settings is built once.
        checkpoint: the local folder of `path` when the caller resolved it already (`finetune.run.build` does, once);
            None: resolved here (`local_checkpoint`).
    """

    setting_ranges = {"max_new_tokens": ">=1"}  # checked by finetune.settings.check before anything is built

    def __init__(self, path: str = "THUDM/cogvlm-base-490-hf", tokenizer_path: str | None = "lmsys/vicuna-7b-v1.5",
                 dtype: str = "bf16", lora_targets: list[str] = ("language_expert_attention", "vit_attention"),
                 max_new_tokens: int = 10, prompt: str = "CAPTCHA:", template_version: str | None = None,
                 tiny: dict | None = None, checkpoint: str | None = None):
        super().__init__()
        self.lora_target_modules = lora_target_modules(lora_targets)
        self.path, self.max_new_tokens, self.weight_dtype = path, max_new_tokens, parse_dtype(dtype)
        self.processor = self.data_processor(checkpoint or self.local_checkpoint(path, tiny),
                                             tokenizer_path=tokenizer_path, prompt=prompt,
                                             template_version=template_version)
        self.local_path, self.tokenizer = self.processor.model_dir, self.processor.tokenizer
        self.model = CogVLMForCausalLM.from_pretrained(self.local_path, dtype=self.weight_dtype)
        self.model.requires_grad_(False)

    @classmethod
    def local_checkpoint(cls, path: str, tiny: dict | None = None, weights: bool = True) -> str:
        """The local folder of `path` (hub id, folder, or `tiny`: built once per `tiny` settings): `resolve_model`;
        `weights=False`: a hub id's configs and tokenizers only."""
        return resolve_model(path, tiny, weights)

    @classmethod
    def data_processor(cls, checkpoint: str, tokenizer_path: str | None = "lmsys/vicuna-7b-v1.5",
                       prompt: str = "CAPTCHA:", template_version: str | None = None) -> CogVLMProcessor:
        """The tokenizer, template and image size of `checkpoint` (the local folder, `local_checkpoint`; config and
        tokenizer only, no weights)."""
        local = checkpoint
        config = CogVLMConfig.from_pretrained(local)
        return CogVLMProcessor(load_tokenizer(local, tokenizer_path), prompt, template_version or config.template_version,
                               config.vision_config["image_size"], config.num_image_tokens, model_dir=local)

    @classmethod
    def trainable_module_names(cls, checkpoint: str) -> dict[str, str]:
        """Qualified name -> class name of every submodule of the model, built from the config.json of `checkpoint`
        (the local folder) on the meta device (no weights read, no memory): what `adapter.target_modules` and
        `adapter.modules` must match, checked before the model loads
        (`finetune.settings.check.check_trainable_modules`)."""
        with torch.device("meta"):
            model = CogVLMForCausalLM(CogVLMConfig.from_pretrained(checkpoint))
        return {name: type(module).__name__ for name, module in model.named_modules() if name}

    def trainable_module(self) -> nn.Module:
        return self.model

    def encode(self, batch: dict) -> dict:
        return batch  # tokenized and preprocessed by the data module; no frozen encoder to cache

    def training_loss(self, encoded: dict) -> torch.Tensor:
        return self.model(input_ids=encoded["input_ids"], images=encoded["images"],
                          token_type_ids=encoded["token_type_ids"], attention_mask=encoded["attention_mask"],
                          labels=encoded["labels"]).loss

    @torch.no_grad()
    def predict(self, input_ids, images, token_type_ids, attention_mask) -> list[str]:
        """Greedy answers of left-padded prompts, decoded by transformers' `generate` (KV cache)."""
        return generate_answers(self.model, self.tokenizer, input_ids, images, token_type_ids, attention_mask,
                                self.max_new_tokens)

    @torch.no_grad()
    def evaluate(self, batch: dict) -> Evaluation:
        """`loss` on the labelled batch, then greedy decoding of the prompts: `acc`, `acc_w/o_case`, `cer`, and a
        row per sample (key, label, prediction, scores)."""
        loss = self.training_loss(batch)
        predictions = self.predict(batch["prompt_input_ids"], batch["images"], batch["prompt_token_type_ids"],
                                   batch["prompt_attention_mask"])
        scores = exact_match(predictions, batch["label"])
        rows = [{"key": key, "label": label, "prediction": prediction,
                 **{name: values[i] for name, values in scores.items()}}
                for i, (key, label, prediction) in enumerate(zip(batch["key"], batch["label"], predictions))]
        return Evaluation(metrics={"loss": float(loss), **{name: sum(v) / len(v) for name, v in scores.items()}},
                          rows=rows)

    # -- the `cogft` command: reading images, merging, model cards -------------------------------
    @torch.no_grad()
    def generate(self, requests: list[GenerationRequest], seed: int = 0, batch_size: int | None = None) -> list[Sample]:
        """Greedy answers to the recipe's prompt (`model.prompt`; a request's own prompt is not read) about each
        request's image (a path or a PIL image), `batch_size` images at a time (None: all at once); text samples
        captioned with the image's path. Decoding is greedy: `seed` changes nothing."""
        from PIL import Image

        missing = [i for i, request in enumerate(requests) if request.image is None]
        if missing:
            raise ValueError(f"{type(self).__name__} reads images: request {missing[0]} has none; pass an image per "
                             f"request (cogft generate: --image FILE, one or more).")
        images = []
        for request in requests:
            if isinstance(request.image, Image.Image):
                images.append(request.image.convert("RGB"))
            else:
                with Image.open(request.image) as image:
                    images.append(image.convert("RGB"))
        step = batch_size or max(len(images), 1)
        answers = [answer for start in range(0, len(images), step)
                   for answer in predict_images(self.model, self.processor, images[start: start + step],
                                                self.max_new_tokens)]
        return [Sample("text", answer, request.prompt if isinstance(request.image, Image.Image) else str(request.image))
                for request, answer in zip(requests, answers)]

    def merge_loras(self, loras: list[tuple[str, float]], blend_full_modules: bool = False) -> list[dict]:
        """Each PEFT adapter folder (what `export` writes) merged by peft, its LoRA scaling times the given scale.
        The adapter's fully trained modules (`modules_to_save`, e.g. the captcha recipe's ViT MLPs) replace the base's
        as trained, or with `blend_full_modules` become `W_base + scale * (W_trained - W_base)`."""
        from peft import PeftModel
        from peft.tuners.lora import LoraLayer

        record = []
        for path, scale in loras:
            saved = json.loads((Path(path) / "adapter_config.json").read_text()).get("modules_to_save") or []
            full = {n: p.detach().clone() for n, p in self.model.named_parameters() if _saved(n, saved)}
            peft_model = PeftModel.from_pretrained(self.model, str(path))
            for module in peft_model.modules():
                if isinstance(module, LoraLayer):
                    module.scale_layer(scale)
            self.model = peft_model.merge_and_unload()
            if blend_full_modules and full:
                params = dict(self.model.named_parameters())
                with torch.no_grad():
                    for name, base in full.items():
                        trained = params[name]
                        trained.copy_((base.float() + scale * (trained.float() - base.float())).to(trained.dtype))
            record.append({"path": str(path), "scale": scale, "layout": "peft", "modules_to_save": saved,
                           "full_modules": (f"blended at scale {scale}" if blend_full_modules else "as trained")
                           if full else "none"})
        return record

    @classmethod
    def captioner(cls, model: str, **options):
        """CogVLM2-Caption for videos and CogVLM2 chat for images (`recipes/cogvlm/caption.py`); `model` names the video
        model (`tiny`: both tiny). None for a model this family does not know."""
        from .caption import IMAGE_MODEL, CogVLMCaptioner, claims

        image_model = options.pop("image_model", None) or ("tiny" if model == "tiny" else IMAGE_MODEL)
        if not (claims(model) and claims(image_model)):
            return None
        return CogVLMCaptioner(video_model=model, image_model=image_model, **options)

    @classmethod
    def recognize_lora(cls, shapes: dict[str, tuple[int, ...]]) -> str | None:
        """The visual expert's own projections, which no other model has."""
        if any("language_expert" in key or "vision_expert" in key for key in shapes):
            return "CogVLM or CogVLM2 (PEFT adapter)"
        return None

    def save_merged(self, directory: str | os.PathLike) -> Path:
        """The model in the HF layout with its tokenizer (`CogVLMForCausalLM.from_pretrained(directory)`)."""
        self.model.save_pretrained(directory)
        self.tokenizer.save_pretrained(directory)
        return Path(directory)

    def base_checkpoint_dir(self) -> Path | None:
        return Path(self.local_path)

    @classmethod
    def model_card_usage(cls, base: str, repo_id: str, files: list[str]) -> list[str] | None:
        """A PEFT adapter on the native model; anything else: the command's generic lines."""
        if "adapter_config.json" not in files:
            return None
        return ["PEFT:", "", "```python", "from peft import PeftModel", "from recipes.cogvlm import CogVLMForCausalLM",
                "", f'base = CogVLMForCausalLM.from_pretrained("{base}")',
                f'model = PeftModel.from_pretrained(base, "{repo_id}")', "```", ""]

    def enable_gradient_checkpointing(self) -> None:
        # transformers 5 renamed gradient_checkpointing_enable (kept as a deprecated alias).
        enable = getattr(self.model, "activation_checkpointing_enable", None) or self.model.gradient_checkpointing_enable
        enable()

    # -- export -----------------------------------------------------------------------------------
    def export(self, directory: str | os.PathLike, adapter, record: dict | None = None) -> Path:
        """LoRA: a PEFT adapter folder (`write_peft_adapter`, the model record in its safetensors header); full
        finetune: the whole model in the checkpoint's layout (`write_merged_model`)."""
        if isinstance(adapter, LoRA):
            return self.write_peft_adapter(directory, adapter.adapter_name, self.model_record(record))
        return self.write_merged_model(directory)

    def base_record(self) -> dict:
        """CogVLM or CogVLM2 (its config: CogVLM2 has multi-query heads), on the checkpoint `path` names."""
        from finetune.lora_formats.record import base_identity

        variant = "CogVLM2" if self.model.config.num_multi_query_heads is not None else "CogVLM"
        return {"family": "CogVLM", "variant": variant, "base": base_identity(self.path, self.local_path)}

    def write_peft_adapter(self, directory: str | os.PathLike, adapter_name: str = "default",
                           model: dict | None = None) -> Path:
        """A PEFT adapter folder (adapter_config.json + adapter_model.safetensors, keys `base_model.model.*`,
        fully trained modules included): `PeftModel.from_pretrained(CogVLMForCausalLM.from_pretrained(base), dir)`.
        `model`: the kit's record (`MODEL_KEY`) for the safetensors header, which PEFT does not read."""
        from peft.utils import get_peft_model_state_dict
        from safetensors.torch import save_file

        from finetune.lora_formats.files import MODEL_KEY

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        state = get_peft_model_state_dict(self.model, adapter_name=adapter_name)
        state = {f"base_model.model.{k}": v.detach().to("cpu").contiguous() for k, v in state.items()}
        save_file(state, directory / "adapter_model.safetensors",
                  metadata={"format": "pt", **({MODEL_KEY: json.dumps(model, sort_keys=True)} if model else {})})
        config = copy.deepcopy(self.model.peft_config[adapter_name])
        config.base_model_name_or_path = self.local_path if self.path == "tiny" else self.path
        config.inference_mode = True
        config.save_pretrained(str(directory))
        return directory

    def write_merged_model(self, directory: str | os.PathLike) -> Path:
        """The model (LoRA merged, trained modules in place) in the checkpoint's layout and key names: sharded
        safetensors + index, config.json and the tokenizer, so `from_pretrained(dir)` needs nothing else."""
        from huggingface_hub import save_torch_state_dict

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        save_torch_state_dict(merged_state_dict(self.model, dtype=self.weight_dtype), directory, max_shard_size="5GB",
                              metadata={"format": "pt"})
        config = copy.deepcopy(self.model.config)
        config.dtype = self.weight_dtype
        config.save_pretrained(directory)
        self.tokenizer.save_pretrained(directory)
        return directory

    def load_adapter(self, path: str | os.PathLike, adapter) -> None:
        """Load an export: a PEFT folder into the adapter the recipe added (same rank, alpha, targets; injected
        when the model has none), or a full-finetune export's weights into the model."""
        path = Path(path)
        if (path / "adapter_config.json").is_file():
            self._load_peft_adapter(path, getattr(adapter, "adapter_name", "default"))
        elif (path / "config.json").is_file() and not isinstance(adapter, LoRA):
            from transformers.modeling_utils import load_sharded_checkpoint

            load_sharded_checkpoint(self.model, str(path), strict=True)
        else:
            raise FileNotFoundError(f"adapter_path={str(path)!r} holds neither adapter_config.json (a LoRA export) "
                                    f"nor config.json (a full-finetune export, with adapter=full): pass a run's "
                                    f"export folder (run_dir/export).")

    def _load_peft_adapter(self, path: Path, adapter_name: str) -> None:
        from peft import LoraConfig
        from peft.utils import set_peft_model_state_dict
        from safetensors.torch import load_file

        current = getattr(self.model, "peft_config", {}).get(adapter_name)
        if current is None:
            self.model.load_adapter(str(path), adapter_name=adapter_name)
            return
        saved = LoraConfig.from_pretrained(str(path))
        fields = {"r": "adapter.rank", "lora_alpha": "adapter.alpha", "target_modules": "adapter.target_modules",
                  "modules_to_save": "adapter.modules"}
        differ = [f"{option}={_normal(getattr(saved, name))}" for name, option in fields.items()
                  if _normal(getattr(saved, name)) != _normal(getattr(current, name))]
        if differ:
            raise ValueError(f"the adapter in {path} was trained with other settings; pass {' '.join(differ)} "
                             f"(found in {path / 'adapter_config.json'}).")
        state = {k.removeprefix("base_model.model."): v for k, v in load_file(path / "adapter_model.safetensors").items()}
        result = set_peft_model_state_dict(self.model, state, adapter_name=adapter_name)
        if result.unexpected_keys:
            raise ValueError(f"{path}: {len(result.unexpected_keys)} tensors fit no module, e.g. "
                             f"{result.unexpected_keys[0]}; it was exported from another model.")


def _normal(value):
    if isinstance(value, (list, tuple, set)):
        return sorted(value)
    return json.loads(json.dumps(value)) if value is not None else None
