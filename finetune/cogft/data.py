"""`cogft data DATA --recipe NAME`: the data report of a folder (or dataset) as the recipe would train on it, before
any GPU hour is spent, and with `--sheet FILE.png` a contact sheet to look at (finetune/data_report.py).

The data is checked exactly as `train.py` checks it (the recipe's data module, connected to its family's processor:
buckets, frame rules, the text encoder's tokenizer; configs and tokenizers only, no weights load), so the report
is the one every run prints at its start."""

from __future__ import annotations

import json
from pathlib import Path

from .config import compose_recipe


def data_command(data: str, recipe: str, preset: str | None = None, model: str | None = None,
                 sheet: str | None = None, as_json: bool = False, overrides: list[str] | None = None) -> dict:
    """Print the report (or its JSON) and write the sheet; returns the report as a dict (with `sheet`: its path,
    and `tiles`: how many thumbnails it holds)."""
    from hydra.utils import instantiate

    from finetune.data_report import check_long_captions, contact_sheet, data_report, report_rows
    from finetune.run import family_data_processor, resolve_checkpoint

    settings = [f"data.root={data}"] + ([f"model.path={model}"] if model else []) + list(overrides or [])
    cfg = compose_recipe(recipe, preset, settings)
    checkpoint = resolve_checkpoint(cfg.model, weights=False)  # configs and tokenizers: what the checks read
    datamodule = instantiate(cfg.data)
    datamodule.connect(family_data_processor(cfg.model, checkpoint))
    datamodule.check()
    rows = report_rows(datamodule)
    if rows is None:
        raise SystemExit(f"cogft data: the recipe {recipe}'s data module ({type(datamodule).__name__}) gives no data "
                         f"report (it lists no captioned media).")
    report = data_report(datamodule, rows)
    result = report.as_dict()
    if sheet:
        result["sheet"] = str(contact_sheet(rows, Path(sheet)))
        result["tiles"] = len(rows)
    print(json.dumps(result, ensure_ascii=False, indent=1) if as_json else report.text()
          + (f"\ncontact sheet: {result['sheet']} ({result['tiles']} samples)" if sheet else ""))
    check_long_captions(report)  # data.on_long_caption=fail: the report is printed, then the command fails
    return result
