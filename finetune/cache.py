"""Encode once (`module.cache=on`): what the frozen encoders make of every training sample, on disk, read by training
instead. `EncodeOnce` is the whole feature as one component, which `finetune.module.FinetuneModule` calls once from
each of its hooks; a data module takes part only through `sample_index` (`finetune.data.FamilyDataModule`).

- `EncodeOnce`: decides whether a run encodes once (the cache is on, the family has a `cache_namespace`, the data
  module indexes its samples), parks the family's encoders out of the module tree, runs the precompute pass, serves
  the cached encodings to the training loader and brings the encoders to the device where they run meanwhile. Lazy
  encoders: a family's `deferred_components` (the diffusion families' VAE and text encoder) load only when a step
  runs them -- a warm cache loads none before validation, which reads the prompts' embeddings from the cache too
  (`prompt_key`, `precompute_prompts`) -- and are released after each use unless `module.keep_encoders`
  (docs/memory.md#lazy-encoders).
- `EncodedCache`: one safetensors file per sample, `<directory>/<digest(namespace)>/<digest(key)>.safetensors`. The
  namespace is everything the encodings depend on besides the sample -- the family's `cache_namespace()` (model path
  and the encoders' files, dtype, sizes, text length, VAE tiling) and the kit's version (added by
  `encoded_cache`); the key is the data module's sample key (the file by path, size and mtime or by
  its bytes' hash, the bucket, the caption's hash, the conditioning image, the preprocessing). A change to any of them
  gives another file name, so it re-encodes exactly the samples it affects and a stale entry is never read: no one
  deletes a cache folder by hand (entries no run uses any more stay on disk; remove the folder to reclaim the space).
- `precompute`: the pass before training that writes `family.encode` of every sample the cache lacks, a batch at a
  time (one bucket each), decoded from the data module's training dataset. Resumable: entries are written as they
  are encoded and present ones are skipped, so an interrupted pass continues where it stopped.
- `EncodedSamples`: the data module's training dataset, wrapped (`wrap_samples`): its decoded samples until the
  cache is complete, then each sample's encodings read by its key, so the training loader keeps its sampler,
  buckets, order, sharding and workers and decodes no media.

Why the VAE posterior's moments (mean, logvar) rather than one latent: training draws a fresh latent from the posterior
every step (`recipes.diffusion.objectives.sample_latents`), exactly as without the cache, so caching changes the speed and not
the objective; the price is twice a latent's size on disk (49x480x720 CogVideoX in bf16: 4.5 MB of moments plus 1.9 MB
of T5 embeddings per sample, `bench/encode_cache.py`).
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import os
from pathlib import Path
from typing import Callable, Hashable, Iterable, Literal

import torch
from lightning.pytorch.utilities import rank_zero_info
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader, Dataset

from finetune.atomic import atomic_path
from finetune.checkpointing import kit_version
from finetune.hub import cache_root, global_rng_untouched


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:24]


def files_fingerprint(directory: str | os.PathLike | None, parts: Iterable[str] = ()) -> str:
    """The files under `directory/part` (every part; the whole folder without parts) by name, size and mtime, as a
    short digest: a checkpoint's encoders are identified by their files, not only by the path (a rebuilt tiny model,
    another hub snapshot). `directory` None (components built in memory): "in-memory"."""
    if directory is None:
        return "in-memory"
    root = Path(directory)
    entries = []
    for base in [root / p for p in parts] or [root]:
        for path in sorted(base.rglob("*")) if base.is_dir() else [base] if base.exists() else []:
            if path.is_file():
                stat = path.stat()
                entries.append(f"{path.relative_to(root)}|{stat.st_size}|{stat.st_mtime_ns}")
    return _digest("\n".join(entries))


class EncodedCache:
    """Per-sample encodings in `directory`, under the namespace's own folder (see the module docstring).

    Small and picklable (a path and a string): `EncodedSamples` reads it in loader workers.
    """

    def __init__(self, directory: str | os.PathLike, namespace: str):
        self.root = Path(directory).expanduser()
        self.namespace = namespace
        self.directory = self.root / _digest(namespace)

    def path(self, key: str) -> Path:
        return self.directory / f"{_digest(key)}.safetensors"

    def has(self, key: str) -> bool:
        # Entries appear only whole (written under a private name, then renamed), so existing means complete.
        return self.path(key).is_file()

    def missing(self, keys: list[str]) -> list[int]:
        return [i for i, key in enumerate(keys) if not self.has(key)]

    def read(self, key: str) -> dict[str, torch.Tensor]:
        path = self.path(key)
        try:
            return load_file(str(path))
        except (OSError, RuntimeError, ValueError) as err:  # safetensors raises its own errors as these
            raise RuntimeError(
                f"{path}: the encodings of sample {key!r} cannot be read ({type(err).__name__}: {err}). The precompute "
                f"pass before training writes every missing entry: remove this damaged file and start the run again "
                f"(or train with module.cache=off).") from None

    def write(self, keys: list[str], encoded: dict[str, torch.Tensor]) -> None:
        """Sample i of the batch `encoded` (per-sample tensors, batch first) as the entry of `keys[i]`. Each file is
        written under a private name and renamed (`finetune.atomic.atomic_path`): a crash never leaves a truncated
        entry, and processes sharing the cache (DDP ranks, concurrent runs) never write into each other's files."""
        self.directory.mkdir(parents=True, exist_ok=True)
        label = self.directory / "namespace.txt"  # what this folder holds, for whoever looks at the disk
        if not label.exists():
            with atomic_path(label) as tmp:
                tmp.write_text(self.namespace + "\n", encoding="utf-8")
        for i, key in enumerate(keys):
            sample = {name: value[i].detach().to("cpu").contiguous() for name, value in encoded.items()}
            with atomic_path(self.path(key)) as tmp:
                save_file(sample, str(tmp), metadata={"key": key})


def encoded_cache(family, cache: Literal["on", "off"] | bool, cache_dir: str | None) -> EncodedCache | None:
    """Where a run's encodings are kept (`module.cache`, `module.cache_dir`); None when every step encodes."""
    if cache not in ("on", "off", True, False):
        raise ValueError(f"module.cache={cache!r}: use on (encode every sample once, then train from the cache) or off")
    namespace = family.cache_namespace()
    if cache in ("off", False) or namespace is None:
        return None
    directory = Path(cache_dir).expanduser() if cache_dir else cache_root() / "encoded"
    return EncodedCache(directory, f"{namespace}|kit={kit_version()}")


class EncodedSamples(Dataset):
    """A data module's training dataset `decoded` (in `sample_index()` order, `keys` its keys), as the training loader
    reads it: `decoded`'s own samples until `serving`, then sample i as `{**cache.read(keys[i]), "key": keys[i]}`, read
    a batch at a time (`__getitems__`) and collated by the family's processor as decoded samples are.

    It wraps the dataset from the data module's `setup` on, so a training loader made before the precompute pass
    (Lightning makes one early to count the steps of `max_epochs`) reads the cache once it is served. Picklable
    (`decoded`, keys and an `EncodedCache`), for loader workers under any start method."""

    def __init__(self, decoded: Dataset, keys: list[str], cache: EncodedCache):
        self.decoded, self.keys, self.cache = decoded, keys, cache
        self.serving = False

    def __len__(self) -> int:
        return len(self.keys)

    def __getitems__(self, indices: list[int]) -> list[dict]:
        if self.serving:
            return [{**self.cache.read(self.keys[i]), "key": self.keys[i]} for i in indices]
        getitems = getattr(self.decoded, "__getitems__", None)  # as a loader fetches from `decoded` itself
        return getitems(indices) if getitems else [self.decoded[i] for i in indices]

    def __getitem__(self, index: int) -> dict:
        return self.__getitems__([index])[0]


def wrap_samples(datamodule, cache: EncodedCache) -> EncodedSamples:
    """`datamodule.dataset` (its training dataset, after `setup`) wrapped as `EncodedSamples` of `cache`, not serving
    yet; the data module's training loader, made over `datamodule.dataset`, reads it."""
    decoded = decoded_samples(datamodule.dataset)
    datamodule.dataset = EncodedSamples(decoded, [key for key, _ in datamodule.sample_index()], cache)
    return datamodule.dataset


def serve_encoded(datamodule, cache: EncodedCache) -> EncodedSamples:
    """From now on `datamodule`'s training loader reads the cached encodings instead of decoding its samples (with
    the same batch sampler, buckets, order and workers)."""
    samples = wrap_samples(datamodule, cache)
    samples.serving = True
    return samples


def decoded_samples(dataset: Dataset) -> Dataset:
    """The data module's own (decoding) dataset, unwrapped."""
    return dataset.decoded if isinstance(dataset, EncodedSamples) else dataset


COLLECT_AFTER_BYTES = 64 * 2**20  # `EncodeOnce._put_away` runs a full garbage collection after releasing more


def precompute(cache: EncodedCache, datamodule, encode: Callable[[dict], dict], rank: int = 0, world_size: int = 1,
               barrier: Callable[[], None] | None = None, progress: bool = True,
               prepare: Callable[[], None] | None = None) -> int:
    """Write `encode(batch)` for every training sample of `datamodule` (a `finetune.data.FamilyDataModule` after
    `setup`, decoding) that `cache` lacks; returns how many samples this process encoded.

    With several processes, rank r encodes the missing samples i with i % world_size == r; after `barrier` each
    encodes whatever is still missing (nothing, unless the nodes do not share `cache.directory`). `prepare` runs
    once before this process encodes its first sample (it loads the encoders: a process with nothing to encode loads
    none)."""
    keys = [key for key, _ in datamodule.sample_index()]
    first = {}  # a sample listed several times (data.roots repeats) is encoded once
    missing = [i for i in cache.missing(keys) if first.setdefault(keys[i], i) == i]
    mine = [i for i in missing if i % world_size == rank]
    if rank == 0:
        rank_zero_info(f"encoded cache: {cache.directory} ({len(keys) - len(missing)} of {len(keys)} samples present"
                       + ("; encoding the others once, before training)" if missing else ")"))
    done = _encode(cache, datamodule, encode, mine, progress, prepare)
    if world_size > 1:
        if barrier is not None:
            barrier()
        done += _encode(cache, datamodule, encode, [i for i in cache.missing(keys) if first.get(keys[i], i) == i],
                        progress, prepare)
    return done


def empty_prompt_encoding(cache: EncodedCache, datamodule, encode, prompt_keys: tuple[str, ...],
                          prepare: Callable[[], None] | None = None) -> dict[str, torch.Tensor]:
    """Caption dropout's empty prompt (`finetune.dropout`): the prompt encodings of "" (one sample's, no batch
    dimension), read from `cache` under `EMPTY_PROMPT_KEY`, or encoded once (the first training sample's media with
    the prompt "") and written there; `prepare` runs first then (it loads the encoders)."""
    from finetune.dropout import EMPTY_PROMPT_KEY

    if cache.has(EMPTY_PROMPT_KEY):
        return {k: v for k, v in cache.read(EMPTY_PROMPT_KEY).items() if k in prompt_keys}
    if prepare is not None:
        prepare()
    sample = dict(decoded_samples(datamodule.dataset)[0])
    sample["prompt"] = ""
    batch = datamodule.require_processor().collate([sample])
    encoded = encode(batch)
    kept = {k: encoded[k] for k in prompt_keys}
    cache.write([EMPTY_PROMPT_KEY], kept)
    return {k: v[0].detach().cpu() for k, v in kept.items()}


def _encode(cache: EncodedCache, datamodule, encode, indices: list[int], progress: bool, prepare=None) -> int:
    if not indices:
        return 0
    if prepare is not None:
        prepare()
    from tqdm.auto import tqdm

    done = 0
    with tqdm(total=len(indices), desc="encoding (VAE, text encoder) once", unit="sample",
              disable=not progress) as bar:
        for batch in encoding_loader(datamodule, indices):
            batch_keys = list(batch["key"])
            cache.write(batch_keys, encode(batch))
            done += len(batch_keys)
            bar.update(len(batch_keys))
    return done


def encoding_loader(datamodule, indices: list[int]) -> Iterable[dict]:
    """Decoded, processed and collated batches of the training samples at `indices` (positions in
    `datamodule.sample_index()`), one bucket and at most `batch_size` samples each, loaded from its training dataset
    by `num_workers` processes as training loads them: the input of the precompute pass."""
    index = datamodule.sample_index()
    groups: dict[Hashable, list[int]] = {}
    for i in indices:
        groups.setdefault(index[i][1], []).append(i)
    size = max(1, datamodule.batch_size)
    batches = [group[start: start + size] for group in groups.values() for start in range(0, len(group), size)]
    # Its own generator: the loader's worker seed must not come from the run's global RNG.
    return DataLoader(decoded_samples(datamodule.dataset), batch_sampler=batches,
                      collate_fn=datamodule.require_processor().collate, num_workers=datamodule.num_workers,
                      generator=torch.Generator())


def prompt_key(prompt: str) -> str:
    """The cache key of a validation prompt's embeddings (`ModelFamily.encode_prompts`), in the namespace of the
    samples' encodings: the same model, encoder files, dtype and text length."""
    return f"validation-prompt|{_digest(prompt)}"


def precompute_prompts(cache: EncodedCache, prompts: list[str], encode: Callable[[list[str]], dict], rank: int = 0,
                       world_size: int = 1, prepare: Callable[[], None] | None = None) -> int:
    """Write `encode([prompt])` for every prompt that `cache` lacks (rank r the missing prompts i with
    i % world_size == r); returns how many this process encoded. `prepare` runs before the first."""
    missing = [p for p in dict.fromkeys(prompts) if not cache.has(prompt_key(p))]
    mine = missing[rank::world_size]
    if mine and prepare is not None:
        prepare()
    for prompt in mine:
        cache.write([prompt_key(prompt)], encode([prompt]))
    return len(mine)


class EncodeOnce:
    """Encode once, as one component: `FinetuneModule` builds it from `module.cache`, `module.cache_dir` and
    `module.keep_encoders` and calls it once from each hook (`setup`, `on_fit_start`, `teardown`, the training
    step's `encode`, `generation_inputs`).

    - `setup` (before the strategy moves, wraps or shards the module): a fit encodes once when the cache is on, the
      family has a `cache_namespace` and the data module indexes its samples (`sample_index`); then the family's
      encoders stay out of the module tree (parked on the CPU, still attributes of the family by the same name) and
      the data module's training dataset is wrapped (`EncodedSamples`). Lazy encoders: the family's
      `deferred_components` are not loaded here, except those `training_loss` runs itself (`training_components`,
      an image-to-video VAE without `cache_image_latents`); without encode-once every deferred component loads.
    - `on_fit_start` (the module on its device, the processes connected, before any batch is loaded): the precompute
      pass of the samples and of the validation prompts (`expect_prompts`; each rank its share, the encoders on
      this rank's device, in the training precision, the parameters whole under FSDP/ZeRO-3, the run's random state
      untouched), then the training loader reads the cached encodings. The encoders load only on a rank with
      something to encode, and are released before the first step unless `keep_encoders` (then parked on the CPU):
      a warm cache loads none.
    - `encode(batch)`: what the training step trains on: the batch itself when it was read from the cache, else the
      family's encodings of it (`module.cache=off`, CogVLM, a data module without `sample_index`).
    - `generation_inputs(requests, device)`: validation sampling: each request with its prompt's cached embeddings
      (the text encoder loads only for a prompt not cached), and the components `generate` runs
      (`validation_components`: the VAE) on the device meanwhile, released afterwards unless `keep_encoders`.
    - `teardown`: the loaded encoders back in the module tree, the data module's decoding dataset back.
    """

    def __init__(self, family, cache: Literal["on", "off"] | bool = "on", cache_dir: str | None = None,
                 keep_encoders: bool = False):
        self.family = family
        self.store = encoded_cache(family, cache, cache_dir)  # None: every step encodes
        self.keep_encoders = bool(keep_encoders)
        self.active = False  # decided in `setup`: this fit encodes once
        self.serving = False  # the training batches are the cached encodings (`on_fit_start`)
        self.parked: dict[str, torch.nn.Module] = {}  # the family's loaded encoders, kept out of the module tree
        self.prompts: list[str] = []  # the validation prompts, encoded with the samples (`expect_prompts`)
        self._wrapped: tuple | None = None  # (data module, its `EncodedSamples`) during a fit that encodes once
        self.empty_prompt: dict[str, torch.Tensor] | None = None  # caption dropout's "" (`on_fit_start`)

    def expect_prompts(self, prompts: list[str]) -> None:
        """The validation prompts of this run (`finetune.callbacks.ValidationSamples` tells them in its `setup`):
        the precompute pass encodes those the cache lacks, so validation reads them and needs no text encoder."""
        self.prompts = list(dict.fromkeys(prompts))

    def setup(self, trainer, stage: str) -> None:
        family = self.family
        self.active = stage == "fit" and self.store is not None and _indexed(trainer.datamodule)
        if not self.active:  # every step (or evaluation) may run any encoder: all loaded, in the module tree
            for name in family.deferred_components():
                family.load_component(name)
            return
        for name, why in family.training_components().items():
            family.load_component(name)
            rank_zero_info(f"module.cache=on: the {name} stays loaded for the whole run: {why}.")
        self._park([n for n in family.encoder_names() if family.component_loaded(n)])
        self._wrapped = (trainer.datamodule, wrap_samples(trainer.datamodule, self.store))

    def on_fit_start(self, module, empty_prompt_keys: tuple[str, ...] = ()) -> None:
        """`empty_prompt_keys` (caption dropout, `finetune.dropout`): the prompt encodings of "" are also encoded
        once (or read from the cache), into `self.empty_prompt`."""
        if not self.active:
            return
        from lightning.fabric.utilities.apply_func import move_data_to_device

        from finetune.callbacks import full_parameters
        from finetune.strategies import forward_is_collective

        trainer, (datamodule, samples) = module.trainer, self._wrapped
        family, device = self.family, module.device

        def encode(batch: dict) -> dict:
            return family.encode(move_data_to_device(batch, device))

        # whole parameters under FSDP/ZeRO-3 (an image-to-video VAE stays in the sharded module tree); FSDP2 shards
        # only the trainable network, which encoding does not run
        collective = forward_is_collective(trainer.strategy)
        whole = contextlib.nullcontext() if collective else full_parameters(trainer, module)
        names = tuple(dict.fromkeys(family.encoder_names() + family.prompt_components()))
        try:
            with whole, global_rng_untouched():
                if family.prompt_components():  # as validation sampling encodes them: outside the training precision
                    precompute_prompts(self.store, self.prompts, family.encode_prompts, trainer.global_rank,
                                       trainer.world_size,
                                       prepare=lambda: self._bring(family.prompt_components(), device))
                with trainer.precision_plugin.forward_context():
                    precompute(self.store, datamodule, encode, rank=trainer.global_rank,
                               world_size=trainer.world_size, barrier=trainer.strategy.barrier,
                               progress=trainer.is_global_zero,
                               prepare=lambda: self._bring(family.encoder_names(), device))
                    if empty_prompt_keys:
                        self.empty_prompt = empty_prompt_encoding(
                            self.store, datamodule, encode, empty_prompt_keys,
                            prepare=lambda: self._bring(family.encoder_names(), device))
        finally:
            self._put_away(names)
        loaded = [n for n in dict.fromkeys(names + family.deferred_components()) if family.component_loaded(n)
                  and n not in family.training_components()]
        rank_zero_info("encoders before the first step: " + (
            ", ".join(loaded) + " loaded, parked on the CPU" + (" (module.keep_encoders=true)" if self.keep_encoders
                                                                   else " (not deferred: they stay)")
            if loaded else "none loaded (module.keep_encoders=false; validation loads the VAE decoder, the text "
                           "encoder only for prompts not in the cache)"))
        samples.serving = self.serving = True

    def encode(self, batch: dict) -> dict:
        return batch if self.serving else self.family.encode(batch)

    @contextlib.contextmanager
    def generation_inputs(self, requests: list, device: torch.device):
        """`requests` for the family's `generate`, with their prompts' cached embeddings (`GenerationRequest.
        embeddings`; a prompt not in the cache is encoded and written first), and the components `generate`
        runs on `device` meanwhile; afterwards released (`keep_encoders`: back on the CPU)."""
        import dataclasses

        family = self.family
        if not requests:  # this rank draws nothing (the requests are split across ranks): it loads nothing
            yield requests
            return
        if not self.active:  # the encoders are in the module tree, moved by the strategy
            with self.encoders_on_device(device):
                yield requests
            return
        brought: tuple[str, ...] = ()
        try:
            if family.prompt_components():
                requests = [dataclasses.replace(r, embeddings=self._prompt_embeddings(r.prompt, device))
                            for r in requests]
                brought += family.prompt_components()
            names = family.validation_components(all(r.embeddings is not None for r in requests))
            self._bring(names, device)
            brought += tuple(names)
            yield requests
        finally:
            self._put_away(brought)

    def _prompt_embeddings(self, prompt: str, device: torch.device) -> dict[str, torch.Tensor]:
        key = prompt_key(prompt)
        if not self.store.has(key):
            self._bring(self.family.prompt_components(), device)
            self.store.write([key], self.family.encode_prompts([prompt]))
        return {name: value.unsqueeze(0) for name, value in self.store.read(key).items()}

    @contextlib.contextmanager
    def encoders_on_device(self, device: torch.device):
        """The parked encoders on `device` while they run, back on the CPU afterwards."""
        for encoder in self.parked.values():
            encoder.to(device)
        try:
            yield
        finally:
            for encoder in self.parked.values():
                encoder.to("cpu")
            if device.type == "cuda" and self.parked:
                torch.cuda.empty_cache()

    def _bring(self, names, device: torch.device) -> None:
        """The components `names` on `device`, out of the module tree: parked ones moved, deferred ones loaded.
        One in the module tree (an image-to-video VAE) is the strategy's and stays."""
        for name in names:
            if name in self.parked:
                self.parked[name].to(device)
            elif not self.family.component_loaded(name):
                self.family.load_component(name)
                self._park([name])
                self.parked[name].to(device)

    def _put_away(self, names) -> None:
        """The parked components `names` released (`keep_encoders`: kept, on the CPU)."""
        moved, released = False, 0
        for name in names:
            if name not in self.parked:
                continue
            parameters = list(self.parked[name].parameters())
            moved = moved or any(p.is_cuda for p in parameters)
            if not self.keep_encoders and self.family.release_component(name):
                del self.parked[name]
                released += sum(p.numel() * p.element_size() for p in parameters)
            else:
                self.parked[name].to("cpu")
            del parameters
        # their memory back now, not at the next collection (a full collection takes ~0.15 s with these libraries
        # imported: not worth it for a few MB, as the tiny models' are)
        if released > COLLECT_AFTER_BYTES:
            gc.collect()
        if moved and torch.cuda.is_available():
            torch.cuda.empty_cache()

    def teardown(self) -> None:
        if self._wrapped is not None:  # the data module's own dataset back
            datamodule, samples = self._wrapped
            datamodule.dataset = samples.decoded
        self._wrapped, self.serving = None, False
        for name, child in self.parked.items():
            self.family.__dict__.pop(name, None)
            self.family._modules[name] = child
        self.parked = {}

    def _park(self, names) -> None:
        """The family's loaded components `names` out of the module tree, on the CPU: the strategy never moves,
        wraps or shards them. They stay attributes of the family (and of its pipeline), by the same name."""
        for name in names:
            child = self.family._modules.get(name)
            if child is not None:
                del self.family._modules[name]
                object.__setattr__(self.family, name, child.to("cpu"))
                self.parked[name] = child


def _indexed(datamodule) -> bool:
    if datamodule is not None and getattr(datamodule, "sample_index", lambda: None)() is not None:
        return True
    what = type(datamodule).__name__ if datamodule is not None else "a dataloader without a data module"
    rank_zero_info(f"module.cache=on: {what} does not index its samples (sample_index); every batch is decoded "
                   f"and encoded each step.")
    return False
