"""One split of a dataset that is not a plain folder of media: a `save_to_disk` folder, parquet file(s), or a hub
dataset, read with `datasets` (imported only here, only when such a root is used)."""

from __future__ import annotations

from pathlib import Path

from datamodules.textfiles import DataError


def load_split(root: str, split: str, dataset_config: str | None, no_data: str, no_path: str):
    """`(dataset, folder)`: the split of `root` and the folder its relative paths are relative to. The data module
    words two of the errors for its layouts: `no_data` when `root` exists but holds neither a saved dataset nor
    parquet files, `no_path` when a local-looking `root` does not exist."""
    import datasets

    path = Path(root).expanduser()
    if path.is_dir() and ((path / "state.json").exists() or (path / "dataset_dict.json").exists()):
        ds = datasets.load_from_disk(str(path))
    elif path.exists():
        files = [str(path)] if path.is_file() else sorted(str(p) for p in path.rglob("*.parquet"))
        if not files:
            raise DataError(no_data)
        ds = datasets.load_dataset("parquet", data_files=files, split="train")
    elif root.startswith((".", "/", "~")):
        raise DataError(no_path)
    else:
        try:
            ds = datasets.load_dataset(root, dataset_config, split=split)
        except Exception as err:
            raise DataError(f"data.root={root!r}: could not load it from the hub ({type(err).__name__}: "
                            f"{str(err).splitlines()[0] if str(err) else ''}). Download it where there is network "
                            f"(`ds.save_to_disk(DIR)`) and pass data.root=DIR.") from None
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise DataError(f"data.root={root!r} has splits {sorted(ds)}; set data.split to one of them.")
        ds = ds[split]
    return ds, (path if path.is_dir() else path.parent)
