"""Caption dropout (`data.caption_dropout`): a fraction of the training samples trained with the empty prompt, so
that the model keeps an unconditional prediction for classifier-free guidance (kohya's `caption_dropout_rate`).

Drawn per sample and step from the run's seed, the step and the rank (`mask`): a resumed run drops the same samples
an uninterrupted run would, and the model's own noise draws are untouched. The family names the encodings that
come from the prompt alone (`ModelFamily.prompt_keys`, e.g. `prompt_embeds`):

- training from the encoded cache (`module.cache=on`): the empty prompt is encoded once, with the first training
  sample's media and the prompt "", and its prompt encodings are cached under `EMPTY_PROMPT_KEY` beside the
  samples'; a dropped sample's prompt encodings are replaced by them. The samples' own keys do not change, so
  turning dropout on or off re-encodes nothing.
- encoding every step (`module.cache=off`): a dropped sample's prompt is "" before `encode`.
"""

from __future__ import annotations

import torch

from finetune.data import DataError

EMPTY_PROMPT_KEY = "caption-dropout|empty-prompt"


class CaptionDropout:
    def __init__(self, fraction: float, prompt_keys: tuple[str, ...], seed: int | None, rank: int = 0,
                 family_name: str = "the model family"):
        if fraction and not prompt_keys:
            raise DataError(f"data.caption_dropout={fraction}: {family_name} names no prompt encodings "
                            f"(ModelFamily.prompt_keys), so captions cannot be dropped for it. Set "
                            f"data.caption_dropout=0.")
        self.fraction, self.prompt_keys = float(fraction), tuple(prompt_keys)
        self.seed, self.rank = int(seed or 0), rank
        self.empty: dict[str, torch.Tensor] | None = None  # one sample's prompt encodings of ""

    def mask(self, count: int, step: int) -> torch.Tensor:
        """Which of the `count` samples of step `step` train with the empty prompt (bool [count])."""
        generator = torch.Generator().manual_seed((self.seed * 1_000_003 + step) * 1009 + self.rank)
        return torch.rand(count, generator=generator) < self.fraction

    def drop_prompts(self, batch: dict, step: int) -> dict:
        """A raw batch (to be encoded) with the dropped samples' prompts replaced by ""."""
        dropped = self.mask(len(batch["prompt"]), step)
        if not dropped.any():
            return batch
        return {**batch, "prompt": ["" if d else p for p, d in zip(batch["prompt"], dropped.tolist())]}

    def drop_encoded(self, encoded: dict, step: int) -> dict:
        """An encoded batch with the dropped samples' prompt encodings replaced by the empty prompt's."""
        count = len(next(iter(encoded.values())))
        dropped = self.mask(count, step)
        if not dropped.any():
            return encoded
        out = dict(encoded)
        for name in self.prompt_keys:
            value = encoded[name]
            empty = self.empty[name].to(value.device, value.dtype)
            where = dropped.to(value.device).view(-1, *([1] * (value.dim() - 1)))
            out[name] = torch.where(where, empty.unsqueeze(0).expand_as(value), value)
        return out

