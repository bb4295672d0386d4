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
    exact_match,
    lora_target_modules,
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
    scores = exact_match(["AbC", " x1 ", "q", ""], ["abc", "x1", "Q", "z"])
    assert scores == {"acc": [0.0, 1.0, 0.0, 0.0], "acc_w/o_case": [1.0, 1.0, 1.0, 0.0]}
    family = CogVLM(path=tiny_cogvlm, dtype="fp32")
    batch = _batch(family)
    batch.update({f"prompt_{k}": batch[k] for k in ("input_ids", "token_type_ids", "attention_mask")})
    batch.update(label=["7a", "Q3x9", "0"], key=["a", "b", "c"])
    monkeypatch.setattr(family, "predict", lambda *args: ["7a", "q3x9", "1"])
    result = family.evaluate(batch)
    metrics = result.metrics
    assert metrics["acc"] == pytest.approx(1 / 3) and metrics["acc_w/o_case"] == pytest.approx(2 / 3)
    assert metrics["loss"] == pytest.approx(family.training_loss(batch).item())
    assert [(r["key"], r["prediction"], r["acc_w/o_case"]) for r in result.rows] == [
        ("a", "7a", 1.0), ("b", "q3x9", 1.0), ("c", "1", 0.0)]


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


@pytest.fixture(scope="module")
def fitted(tiny_cogvlm, tmp_path_factory):
    """The README demo, shortened: 4 steps, validation after steps 2 and 4."""
    run_dir = tmp_path_factory.mktemp("cogvlm_fit")
    train(compose(["recipe=cogvlm_captcha_lora", "preset=tiny", "logger=csv", f"run_dir={run_dir}",
                   "trainer.max_steps=4", "trainer.val_check_interval=2", "data.demo_count=60",
                   "callbacks.checkpoint.every_n_train_steps=4"]))
    return run_dir


def _metrics(run_dir) -> list[dict]:
    return list(csv.DictReader(open(run_dir / "csv" / "metrics.csv")))


def test_fit_validates_by_decoding_and_exports_a_peft_adapter(fitted):
    rows = [r for r in _metrics(fitted) if r.get("val/acc")]
    assert [int(r["step"]) for r in rows] == [1, 3]  # logged at the last step of each interval
    assert all(0.0 <= float(r["val/acc"]) <= float(r["val/acc_w/o_case"]) <= 1.0 for r in rows)
    table = (fitted / "predictions" / "val_step_000004.tsv").read_text().splitlines()
    assert table[0].split("\t") == ["key", "label", "prediction", "acc", "acc_w/o_case"] and len(table) == 1 + 3
    assert {p.name for p in (fitted / "export").iterdir()} == {"adapter_config.json", "adapter_model.safetensors"}


def test_mode_test_with_an_exported_adapter_logs_a_wandb_table(fitted, tmp_path):
    module = train(compose(["recipe=cogvlm_captcha_lora", "preset=tiny", "logger=wandb", f"run_dir={tmp_path}",
                            "mode=test", f"adapter_path={fitted / 'export'}", "data.demo_count=60"]))
    table = (tmp_path / "predictions" / "test_step_000000.tsv").read_text().splitlines()
    assert len(table) == 1 + 9  # 60 generated captchas: 48 / 3 / 9
    correct = sum(float(line.split("\t")[3]) for line in table[1:])
    assert float(module.trainer.callback_metrics["test/acc"]) == pytest.approx(correct / 9)
    (logged,) = tmp_path.glob("wandb/offline-run-*/files/media/table/test/predictions_*.table.json")
    content = json.loads(logged.read_text())
    assert content["columns"] == ["image", "key", "label", "prediction", "acc", "acc_w/o_case"]
    assert len(content["data"]) == 9
    # the training checkpoint holds the same weights as the export: the same predictions
    train(compose(["recipe=cogvlm_captcha_lora", "preset=tiny", "logger=csv", f"run_dir={tmp_path / 'ckpt'}",
                   "mode=test", f"ckpt_path={fitted / 'checkpoints' / 'last.ckpt'}", "data.demo_count=60"]))
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
