"""Captcha images and their labels from three sources, as `datasets.Dataset` splits (columns `key`, `label` and,
except for generated captchas, `image`).

- A folder in the Kaggle "captcha-images" layout (the official CogVLM finetune data): `.jpg`/`.png` files whose
  stem is the label. Split 80/5/15 like THUDM/CogVLM `utils/split_dataset.py` (shuffle, then slice
  `int(0.8 n)`, `int(0.05 n)`, `int(0.15 n)`), made reproducible: names sorted, then `random.Random(2023).shuffle`,
  the rounding remainder (dropped by the official script) added to train. No file is moved.
- A Hugging Face dataset (hub name or `save_to_disk` folder) with an image and a text column, e.g.
  `project-sloth/captcha-images` (`image`, `solution`; train/validation/test); one split only -> 80/5/15 as above.
- Captchas generated on the fly with the `captcha` package: label and image are functions of (seed, index).
"""

from __future__ import annotations

import io
import math
import random
import threading
from contextlib import contextmanager
from pathlib import Path

from PIL import Image

from datamodules.sample_checks import BadSamples, check_all
from datamodules.textfiles import DataError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
SPLITS = ("train", "val", "test")
DEFAULT_HF_SPLITS = {"train": "train", "val": "validation", "test": "test"}


def split_indices(count: int, fractions=(0.8, 0.05, 0.15), seed: int = 2023) -> dict[str, list[int]]:
    """Disjoint train/val/test index lists covering range(count), the same for the same (count, fractions, seed)."""
    if len(fractions) != 3 or any(f < 0 for f in fractions) or sum(fractions) > 1 + 1e-9:
        raise DataError(f"data.split_fractions={list(fractions)}: give three non-negative fractions (train, val, "
                        f"test) that sum to at most 1, e.g. [0.8, 0.05, 0.15].")
    order = list(range(count))
    random.Random(seed).shuffle(order)
    train_n, val_n, test_n = (int(f * count) for f in fractions)
    return {"train": order[:train_n] + order[train_n + val_n + test_n:],
            "val": order[train_n: train_n + val_n],
            "test": order[train_n + val_n: train_n + val_n + test_n]}


def _unreadable(source, name: str) -> str | None:
    """None if `source` (a path or bytes) decodes in full as an image, else the reason, naming it."""
    try:
        with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as image:
            image.load()
    except Exception as err:  # PIL raises many types for broken files
        return f"{name}: not a readable image ({type(err).__name__}: {err})"
    return None


def readable(sources: list, names: list[str], on_bad_sample: str, fix: str) -> list[int]:
    """Indices of the sources that decode, each decoded in full on a thread pool; the others fail the run (all
    named) or, with on_bad_sample=skip, are left out with a warning each."""
    bad = BadSamples(on_bad_sample)
    reasons = check_all(range(len(sources)), lambda i: _unreadable(sources[i], names[i]), total=len(sources))
    kept = []
    for index, reason in enumerate(reasons):
        if reason:
            bad.add(reason)
        else:
            kept.append(index)
    bad.finish(len(sources), fix)
    return kept


def check_split_sizes(sizes: dict[str, int], fractions, what: str, wanted=SPLITS) -> None:
    """Every split the fractions ask for holds at least one image (`int(fraction * count)` rounds small sets down
    to nothing): name what each split got and the fix."""
    empty = [split for split in dict.fromkeys(wanted) if not sizes[split]]
    if not empty:
        return
    count = sum(sizes.values())
    got = ", ".join(f"{split} {sizes[split]}" for split in SPLITS)
    needed = math.ceil(1 / min(f for f in fractions if f > 0)) if any(f > 0 for f in fractions) else count
    raise DataError(f"{what}: the data.split_fractions={list(fractions)} split of {count} image(s) gives {got}: "
                    f"{' and '.join(empty)} {'is' if len(empty) == 1 else 'are'} empty. Use at least {needed} images, "
                    f"or raise the fraction of {' and '.join(empty)} (set it to 0 to have no such split).")


def folder_splits(root: Path, fractions, seed: int, check_images: bool = True, on_bad_sample: str = "fail") -> dict:
    """Kaggle layout: every image directly in `root`, label = file stem."""
    import datasets

    if not root.is_dir():
        raise DataError(f"data.root={str(root)!r} is not a directory. Point it at the folder of captcha images "
                        f"(label = file name, e.g. 2b827.png), set data.hf_dataset, or use data.root=demo.")
    files = sorted(p for p in root.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise DataError(f"{root} holds no .jpg or .png file. The Kaggle layout keeps every captcha directly in the "
                        f"folder, named by its label (e.g. {root}/2b827.png).")
    if check_images:
        kept = readable(files, [str(p) for p in files], on_bad_sample,
                        "Delete or replace them (a captcha must open with PIL), then run again.")
        files = [files[i] for i in kept]
    parts = split_indices(len(files), fractions, seed)
    check_split_sizes({split: len(index) for split, index in parts.items()}, fractions, f"data.root={str(root)!r}",
                      [split for split, fraction in zip(SPLITS, fractions) if fraction > 0] + ["train"])
    return {split: datasets.Dataset.from_dict({
        "key": [files[i].name for i in index],
        "label": [files[i].stem.strip() for i in index],
        "image": [str(files[i]) for i in index],
    }).cast_column("image", datasets.Image()) for split, index in parts.items()}


def _load_hf(name: str):
    import datasets

    local = Path(name).expanduser()
    if local.exists():
        try:
            return datasets.load_from_disk(str(local))
        except Exception as err:
            raise DataError(f"data.hf_dataset={name!r}: {local} is not a dataset written by save_to_disk "
                            f"({type(err).__name__}: {err}).") from None
    try:
        return datasets.load_dataset(name)
    except Exception as err:
        raise DataError(f"data.hf_dataset={name!r} could not be loaded ({type(err).__name__}: "
                        f"{str(err).splitlines()[0] if str(err) else ''}). Without network, download it elsewhere "
                        f"(`datasets.load_dataset(name).save_to_disk(DIR)`) and pass data.hf_dataset=DIR.") from None


def hf_splits(name: str, image_column: str, text_column: str, split_names: dict | None, fractions, seed: int,
              check_images: bool = True, on_bad_sample: str = "fail") -> dict:
    """The dataset's own train/val/test splits (named by `split_names`), or one split cut 80/5/15."""
    import datasets

    loaded, names = _load_hf(name), {**DEFAULT_HF_SPLITS, **(split_names or {})}
    if isinstance(loaded, datasets.DatasetDict) and all(names[s] in loaded for s in SPLITS):
        splits = {s: loaded[names[s]] for s in SPLITS}
        wanted = SPLITS
    elif isinstance(loaded, datasets.Dataset) or len(loaded) == 1:
        single = loaded if isinstance(loaded, datasets.Dataset) else next(iter(loaded.values()))
        splits = {s: single.select(index) for s, index in split_indices(len(single), fractions, seed).items()}
        wanted = [split for split, fraction in zip(SPLITS, fractions) if fraction > 0] + ["train"]
    else:
        raise DataError(f"data.hf_dataset={name!r} has splits {sorted(loaded)}, not {sorted(names.values())}: "
                        f"set data.hf_splits (e.g. {{train: train, val: valid, test: test}}).")
    out = {}
    for split, ds in splits.items():
        for column in (image_column, text_column):
            if column not in ds.column_names:
                raise DataError(f"data.hf_dataset={name!r} ({split}) has no column {column!r}; its columns are "
                                f"{ds.column_names}. Set data.image_column and data.text_column.")
        ds = ds.select_columns([image_column, text_column]).rename_columns({image_column: "image", text_column: "label"})
        ds = ds.cast_column("image", datasets.Image(decode=False))
        keys = [f"{name}/{split}/{i}" for i in range(len(ds))]
        ds = ds.add_column("key", keys)
        if check_images:
            items = ds["image"]
            kept = readable([item["bytes"] or item["path"] for item in items],
                            [item["path"] or keys[i] for i, item in enumerate(items)], on_bad_sample,
                            f"Fix or drop those rows of {name}.")
            ds = ds.select(kept) if len(kept) < len(ds) else ds
        empty = [key for key, label in zip(ds["key"], ds["label"]) if not str(label or "").strip()]
        if empty:
            raise DataError(f"{len(empty)} sample(s) with an empty {text_column!r}, e.g. {empty[:3]}: drop them.")
        out[split] = ds.cast_column("image", datasets.Image())
    if wanted is SPLITS:  # the dataset's own splits
        empty = [split for split in SPLITS if not len(out[split])]
        if empty:
            raise DataError(f"data.hf_dataset={name!r}: {', '.join(f'{s} ({names[s]!r})' for s in empty)} "
                            f"{'has' if len(empty) == 1 else 'have'} no usable samples (train {len(out['train'])}, "
                            f"val {len(out['val'])}, test {len(out['test'])}). Set data.hf_splits to non-empty splits.")
    else:
        check_split_sizes({split: len(ds) for split, ds in out.items()}, fractions, f"data.hf_dataset={name!r}",
                          wanted)
    return out


class _SeededSecrets:
    """The three `secrets` functions captcha 0.7 draws from, on a seeded `random.Random`: `secrets` reads OS
    entropy and cannot be seeded, so generated captchas would differ on every run."""

    def __init__(self, rng: random.Random):
        self.randbelow, self.randbits, self.choice = rng.randrange, rng.getrandbits, rng.choice


_CAPTCHA_LOCK = threading.Lock()


@contextmanager
def _seeded_captcha(rng: random.Random):
    import captcha.image

    # captcha.image draws from the module `secrets` (0.7) or `random` (older releases): swap in seeded ones.
    seeded = {name: fake for name, fake in (("secrets", _SeededSecrets(rng)), ("random", rng))
              if hasattr(captcha.image, name)}
    with _CAPTCHA_LOCK:
        originals = {name: getattr(captcha.image, name) for name in seeded}
        try:
            for name, fake in seeded.items():
                setattr(captcha.image, name, fake)
            yield
        finally:
            for name, original in originals.items():
                setattr(captcha.image, name, original)


class CaptchaGenerator:
    """`count` captchas of `length` characters from `charset`, `width` x `height` pixels (the captcha package's
    ImageCaptcha, DroidSansMono). Sample i is the same for the same seed, in any process and order."""

    def __init__(self, count: int = 1000, length: int = 4, charset: str = "0123456789abcdefghijklmnopqrstuvwxyz",
                 width: int = 160, height: int = 60, seed: int = 2023):
        if count < 3 or length < 1 or not charset or width < 8 or height < 8:
            raise DataError(f"generated captchas: need demo_count >= 3, demo_length >= 1, a non-empty demo_charset "
                            f"and demo_width/demo_height >= 8; got {count}, {length}, {charset!r}, {width}x{height}.")
        self.count, self.length, self.charset = count, length, charset
        self.width, self.height, self.seed = width, height, seed
        self._captcha = None  # built lazily in each worker process (FreeType fonts do not pickle)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_captcha": None}

    def _rng(self, index: int) -> random.Random:
        return random.Random(self.seed * 1_000_003 + index)

    def label(self, index: int) -> str:
        rng = self._rng(index)
        return "".join(rng.choice(self.charset) for _ in range(self.length))

    def image(self, index: int) -> Image.Image:
        from captcha.image import ImageCaptcha

        if self._captcha is None:
            self._captcha = ImageCaptcha(width=self.width, height=self.height)
        rng = self._rng(index)
        label = "".join(rng.choice(self.charset) for _ in range(self.length))  # same draws as label()
        with _seeded_captcha(rng):
            return self._captcha.generate_image(label)

    def splits(self, fractions, seed: int) -> dict:
        import datasets

        parts = split_indices(self.count, fractions, seed)
        check_split_sizes({split: len(index) for split, index in parts.items()}, fractions,
                          f"data.demo_count={self.count}",
                          [split for split, fraction in zip(SPLITS, fractions) if fraction > 0] + ["train"])
        return {split: datasets.Dataset.from_dict({
            "key": [f"generated/{self.seed}/{i}" for i in index],
            "label": [self.label(i) for i in index],
            "index": index,
        }) for split, index in parts.items()}
