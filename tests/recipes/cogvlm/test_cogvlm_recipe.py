"""The CogVLM captcha recipe: LoRA targets, golden losses, exact-match evaluation, PEFT and merged exports,
adapter loading, fit/test through the composed config, and the inference command."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
from conftest import compose
from PIL import Image
from safetensors import safe_open

from finetune.adapters import LoRA, merged_state_dict
from finetune.run import train
from recipes.cogvlm import (
    CogVLMForCausalLM,
    build_conversation_input_ids,
    collate_left_padded,
)
from recipes.cogvlm.family import (
    CogVLM,
    edit_distance,
    exact_match,
    lora_target_modules,
    resolve_model,
)




def _batch(family: CogVLM, labels=("7a", "Q3x9", "0")) -> dict:
    generator = torch.Generator().manual_seed(0)
    samples = []
    for label in labels:  # different lengths: rows are left-padded
        sample = build_conversation_input_ids(family.tokenizer, "CAPTCHA:", images=1, answer=label,
                                              image_token_count=family.model.config.num_image_tokens)
        sample["images"] = torch.randn(3, 28, 28, generator=generator)
        samples.append(sample)
    return collate_left_padded(samples, family.tokenizer.pad_token_id)


def _logits(model, batch) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], images=batch["images"], token_type_ids=batch["token_type_ids"],
                     attention_mask=batch["attention_mask"]).logits


def _lora_family(path: str, rank: int = 4, alpha: float = 8, perturb: bool = True) -> CogVLM:
    torch.manual_seed(0)
    family = CogVLM(path=path, dtype="fp32")
    LoRA(rank=rank, alpha=alpha, modules=["vision.transformer.layers.1.mlp"]).apply(family.model,
                                                                                  family.lora_target_modules)
    if perturb:  # non-zero LoRA B and a changed MLP copy, as after training
        for param in (p for p in family.model.parameters() if p.requires_grad):
            param.data += 0.05 * torch.randn_like(param)
    return family


def test_lora_target_names():
    assert lora_target_modules(["language_expert_attention", "vit_attention"]) == (
        "language_expert_query_key_value", "language_expert_dense", "attention.query_key_value", "attention.dense")
    with pytest.raises(ValueError, match=r"unknown \['vit_attn'\].*language_expert_attention.*vit_mlp"):
        lora_target_modules(["vit_attn"])


def test_recipe_targets_hit_the_real_architecture():
    from finetune.adapters import matching_modules
    from recipes.cogvlm import CogVLMConfig

    with torch.device("meta"):  # CogVLM-17B's layout (32 decoder layers, 63 ViT layers), no memory
        model = CogVLMForCausalLM(CogVLMConfig())
    lora, sft = compose(["recipe=cogvlm_captcha_lora"]), compose(["recipe=cogvlm_captcha_sft"])
    targets = lora_target_modules(lora.model.lora_targets)
    adapted = [name for name, _ in model.named_modules() if any(name.endswith("." + t) for t in targets)]
    assert len(adapted) == 32 * 2 + 63 * 2  # QKV + dense of every language expert and every ViT layer
    vit_mlps = [f"model.vision.transformer.layers.{i}.mlp" for i in range(46, 55)]
    assert matching_modules(model, lora.adapter.modules) == vit_mlps
    assert matching_modules(model, sft.adapter.modules) == vit_mlps + ["model.vision.linear_proj"]


def test_exact_match_and_evaluate(tiny_cogvlm, monkeypatch):
    scores = exact_match(["AbC", " x1 ", "q", "", "12345"], ["abc", "x1", "Q", "z", "1234"])
    assert scores == {"acc": [0.0, 1.0, 0.0, 0.0, 0.0], "acc_w/o_case": [1.0, 1.0, 1.0, 0.0, 0.0],
                      "cer": [2 / 3, 0.0, 1.0, 1.0, 0.25]}
    assert [edit_distance(*pair) for pair in [("kitten", "sitting"), ("", "abc"), ("abc", ""), ("flaw", "lawn"),
                                               ("ab", "ba"), ("same", "same")]] == [3, 3, 3, 2, 2, 0]
    family = CogVLM(path=tiny_cogvlm, dtype="fp32")
    batch = _batch(family)
    batch.update({f"prompt_{k}": batch[k] for k in ("input_ids", "token_type_ids", "attention_mask")})
    batch.update(label=["7a", "Q3x9", "0"], key=["a", "b", "c"])
    monkeypatch.setattr(family, "predict", lambda *args: ["7a", "q3x9", "1"])
    result = family.evaluate(batch)
    metrics = result.metrics
    assert metrics["acc"] == pytest.approx(1 / 3) and metrics["acc_w/o_case"] == pytest.approx(2 / 3)
    assert metrics["cer"] == pytest.approx((0 + 1 / 4 + 1) / 3)  # q3x9 for Q3x9: one character of four
    assert metrics["loss"] == pytest.approx(family.training_loss(batch).item())
    assert [(r["key"], r["prediction"], r["acc_w/o_case"], r["cer"]) for r in result.rows] == [
        ("a", "7a", 1.0, 0.0), ("b", "q3x9", 1.0, 0.25), ("c", "1", 0.0, 1.0)]


def test_peft_and_merged_exports_reproduce_the_trained_model(tiny_cogvlm, tmp_path):
    from peft import PeftModel

    family = _lora_family(tiny_cogvlm)
    batch = _batch(family)
    trained = _logits(family.model, batch)
    base = CogVLMForCausalLM.from_pretrained(tiny_cogvlm, dtype=torch.float32)
    assert (trained - _logits(base, batch)).abs().max() > 1e-3

    family.export(tmp_path / "lora", LoRA())
    config = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"]) == (4, 8)
    assert config["modules_to_save"] == ["model.vision.transformer.layers.1.mlp"]
    peft_model = PeftModel.from_pretrained(base, tmp_path / "lora")
    torch.testing.assert_close(_logits(peft_model, batch), trained, rtol=1e-5, atol=1e-5)

    family.write_merged_model(tmp_path / "full")
    keys = set()
    for file in (tmp_path / "full").glob("*.safetensors"):
        with safe_open(file, "pt") as handle:
            keys |= set(handle.keys())
    base_keys = set(json.loads((Path(tiny_cogvlm) / "model.safetensors.index.json").read_text())["weight_map"])
    assert keys == base_keys
    merged = CogVLMForCausalLM.from_pretrained(tmp_path / "full", dtype=torch.float32)
    torch.testing.assert_close(_logits(merged, batch), trained, rtol=1e-5, atol=1e-5)
    # W_merged = W + (alpha / r) * B @ A
    layer = family.model.model.layers[0].self_attn.language_expert_dense
    expected = layer.base_layer.weight + 2.0 * layer.lora_B["default"].weight @ layer.lora_A["default"].weight
    state = merged_state_dict(family.model, dtype=torch.float32)
    torch.testing.assert_close(state["model.layers.0.self_attn.language_expert_dense.weight"], expected)


def test_load_adapter_into_the_recipe_adapter(tiny_cogvlm, tmp_path):
    family = _lora_family(tiny_cogvlm)
    batch = _batch(family)
    family.export(tmp_path, LoRA())
    fresh = _lora_family(tiny_cogvlm, perturb=False)
    fresh.load_adapter(tmp_path, LoRA())
    torch.testing.assert_close(_logits(fresh.model, batch), _logits(family.model, batch))
    with pytest.raises(ValueError, match=r"adapter.rank=4 adapter.alpha=8"):
        _lora_family(tiny_cogvlm, rank=2, alpha=2, perturb=False).load_adapter(tmp_path, LoRA())


def test_gradient_checkpointing_gives_the_same_gradients(tiny_cogvlm):
    grads = []
    for checkpointing in (False, True):
        family = _lora_family(tiny_cogvlm)
        if checkpointing:
            family.enable_gradient_checkpointing()
        family.model.train()
        family.training_loss(_batch(family)).backward()
        grads.append({n: p.grad.clone() for n, p in family.model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys() and all(g.abs().max() > 0 for g in grads[0].values())
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], msg=name)


SPLIT = "data.split_fractions=[0.8,0.05,0.15]"  # 60 captchas: 48 / 3 / 9 (the preset's 1% val would be empty)


@pytest.fixture(scope="module")
def fitted(tiny_cogvlm, tmp_path_factory):
    """The CogVLM demo of docs/cogvlm.md, shortened: 4 steps, validation after steps 2 and 4."""
    run_dir = tmp_path_factory.mktemp("cogvlm_fit")
    train(compose(["recipe=cogvlm_captcha_lora", "preset=tiny", "logger=csv", f"run_dir={run_dir}",
                   "trainer.max_steps=4", "trainer.val_check_interval=2", "data.demo_count=60", SPLIT,
                   "callbacks.checkpoint.every_n_train_steps=4"]))
    return run_dir


def _metrics(run_dir) -> list[dict]:
    return list(csv.DictReader(open(run_dir / "csv" / "metrics.csv")))


def test_fit_validates_by_decoding_and_exports_a_peft_adapter(fitted):
    rows = [r for r in _metrics(fitted) if r.get("val/acc")]
    assert [int(r["step"]) for r in rows] == [1, 3]  # logged at the last step of each interval
    assert all(0.0 <= float(r["val/acc"]) <= float(r["val/acc_w/o_case"]) <= 1.0 for r in rows)
    table = (fitted / "predictions" / "val_step_000004.tsv").read_text().splitlines()
    assert table[0].split("\t") == ["key", "label", "prediction", "acc", "acc_w/o_case", "cer"] and len(table) == 1 + 3
    assert all(0.0 <= float(r["val/cer"]) for r in rows)
    assert {p.name for p in (fitted / "export").iterdir()} == {"adapter_config.json", "adapter_model.safetensors"}


def test_mode_test_with_an_exported_adapter_logs_a_wandb_table(fitted, tmp_path):
    module = train(compose(["recipe=cogvlm_captcha_lora", "preset=tiny", "logger=wandb", f"run_dir={tmp_path}",
                            "mode=test", f"adapter_path={fitted / 'export'}", "data.demo_count=60", SPLIT]))
    table = (tmp_path / "predictions" / "test_step_000000.tsv").read_text().splitlines()
    assert len(table) == 1 + 9  # 60 generated captchas: 48 / 3 / 9
    correct = sum(float(line.split("\t")[3]) for line in table[1:])
    assert float(module.trainer.callback_metrics["test/acc"]) == pytest.approx(correct / 9)
    (logged,) = tmp_path.glob("wandb/offline-run-*/files/media/table/test/predictions_*.table.json")
    content = json.loads(logged.read_text())
    assert content["columns"] == ["image", "key", "label", "prediction", "acc", "acc_w/o_case", "cer"]
    assert len(content["data"]) == 9
    # the training checkpoint holds the same weights as the export: the same predictions
    train(compose(["recipe=cogvlm_captcha_lora", "preset=tiny", "logger=csv", f"run_dir={tmp_path / 'ckpt'}",
                   "mode=test", f"ckpt_path={fitted / 'checkpoints' / 'last.ckpt'}", "data.demo_count=60", SPLIT]))
    assert (tmp_path / "ckpt" / "predictions" / "test_step_000000.tsv").read_text().splitlines() == table


def test_predict_command(fitted, tiny_cogvlm, tmp_path, capsys):
    from datamodules.captcha_sources import CaptchaGenerator
    from recipes.cogvlm.predict import main, predict

    generator = CaptchaGenerator(count=3, length=2, charset="0123456789", width=60, height=60)
    paths = []
    for index in range(2):
        paths.append(str(tmp_path / f"{generator.label(index)}.png"))
        generator.image(index).save(paths[-1])
    results = main(["--model", tiny_cogvlm, "--adapter", str(fitted / "export"), *paths])
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines == [f"{path}\t{answer}" for path, answer in results] and [r[0] for r in results] == paths
    family = CogVLM(path=tiny_cogvlm, dtype="fp32")
    family.load_adapter(fitted / "export", LoRA())  # no adapter yet: injected from the export's own config
    assert predict(family.model, family.processor, [Image.open(p) for p in paths]) == [r[1] for r in results]


def test_tiny_settings_build_their_own_model(tiny_cogvlm):
    from recipes.cogvlm import CogVLMConfig

    with pytest.raises(ValueError, match=r"model.tiny has unknown keys \['initialiser_range'\]"):
        resolve_model("tiny", {"initialiser_range": 0.1})
    assert resolve_model("tiny") == tiny_cogvlm  # no settings: the default tiny model, shared
    sharp = resolve_model("tiny", {"initializer_range": 0.1})
    assert sharp != tiny_cogvlm and resolve_model("tiny", {"initializer_range": 0.1}) == sharp  # built once
    assert CogVLMConfig.from_pretrained(sharp).initializer_range == 0.1
    std = CogVLMForCausalLM.from_pretrained(sharp).lm_head.weight.std().item()
    assert 0.08 < std < 0.12  # the weights were drawn with it
    config = CogVLMConfig.from_pretrained(resolve_model("tiny", {"cogvlm2": True, "image_size": 84}))
    assert (config.num_key_value_heads, config.rope_theta, config.vision_config["image_size"]) == (2, 500000.0, 84)
    assert config.num_image_tokens == (84 // 14 // 2) ** 2 + 2


def test_cogvlm2_recipe_prompt_and_tokenizer_pad(tmp_path):
    from recipes.cogvlm import build_tiny_tokenizer
    from finetune.run import family_data_processor
    from recipes.cogvlm.family import load_tokenizer

    cfg = compose(["recipe=cogvlm2_captcha_lora", "preset=tiny"])
    processor = family_data_processor(cfg.model)  # as the run connects it
    sample = processor.prompt(answer="42")
    tokenizer = processor.tokenizer
    types = sample["token_type_ids"].tolist()
    assert types[:1 + 6] == [0] + [1] * 6  # [bos] + 2x2 downsampled patches + boi + eoi
    # CogVLM2's chat template, then the answer's tokens and EOS (as its build_conversation_input_ids)
    expected = (tokenizer.encode("Question: CAPTCHA: Answer:", add_special_tokens=False)
                + tokenizer.encode("42", add_special_tokens=False) + [tokenizer.eos_token_id])
    assert sample["input_ids"][7:].tolist() == expected
    # A Llama-3 tokenizer has no pad token: the checkpoint's pad_token_id (CogVLM2: 128002) is used.
    no_pad = build_tiny_tokenizer()
    no_pad.pad_token = None
    no_pad.save_pretrained(tmp_path)
    from recipes.cogvlm import tiny_cogvlm_config

    tiny_cogvlm_config(pad_token_id=3).save_pretrained(tmp_path)
    assert load_tokenizer(tmp_path, None).pad_token_id == 3


@pytest.mark.slow
def test_the_demo_learns_to_read(tmp_path):
    """The SFT demo (`recipe=cogvlm_captcha_sft preset=tiny`), shortened to 800 steps at a constant learning rate
    (a cosine squeezed into 800 steps decays before the model reads: 0.22): exact match on 200 unseen generated
    captchas climbs from chance (1 in 100) to well above it (0.075 after 400 steps, 0.31 after 800 when written),
    and the character error rate falls. A model whose answer cannot depend on the image (a broken vision path)
    stays at chance: without the image no answer beats 1 in 100, so 0.2 leaves room for numerical drift."""
    train(compose(["recipe=cogvlm_captcha_sft", "preset=tiny", "logger=csv", f"run_dir={tmp_path}",
                   "trainer.max_steps=800", "trainer.val_check_interval=400", "lr_scheduler.name=constant",
                   "callbacks.checkpoint=null"]))
    rows = [r for r in _metrics(tmp_path) if r.get("val/acc")]
    acc, cer = [float(r["val/acc"]) for r in rows], [float(r["val/cer"]) for r in rows]
    assert len(acc) == 2 and acc[-1] >= 0.2 and acc[-1] > acc[0] and cer[-1] < cer[0], (acc, cer)


def test_memory_count_for_cogvlm2_with_8bit_adamw():
    """`python bench/cogvlm_memory.py --model cogvlm2 --optimizer adamw8bit` (docs/cogvlm.md): CogVLM2-19B's counts."""
    import sys

    from conftest import REPO

    sys.path.insert(0, str(REPO / "bench"))
    from cogvlm_memory import main

    result = main(["--model", "cogvlm2", "--optimizer", "adamw8bit"])
    lora_language = 32 * 10 * ((4096 + 6144) + (4096 + 4096))  # GQA: QKV is 4096 -> 4096 + 2 * 8 * 128
    lora_vit = 63 * 10 * ((1792 + 5376) + (1792 + 1792))
    vit_mlps = 9 * (1792 * 15360 + 15360 + 15360 * 1792 + 1792)
    assert result["trainable_params"] == lora_language + lora_vit + vit_mlps
    assert 19.0e9 < result["total_params"] < 19.8e9  # CogVLM2-19B
    assert result["trainable_on_gpu_gib"] == pytest.approx(result["trainable_params"] * (4 + 4 + 2) / 2**30)
