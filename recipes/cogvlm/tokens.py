"""CogVLM's token types and position ids, shared by the model (`modeling_cogvlm`), its decoding (`generation_cogvlm`)
and the prompt builder (`prompting`)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

LANGUAGE_TOKEN_TYPE = 0
VISION_TOKEN_TYPE = 1


def build_position_ids(token_type_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """CogVLM position ids: BOS 0, boi 1, every image patch 2, eoi 3, text 4, 5, ... (per image, positions advance by
    3 however many patches it has).

    Same result as the published `build_position_ids` for unpadded rows; padding (attention_mask 0) is skipped,
    so a left-padded row gets the positions it would get alone (the published function shifts it by one).
    Padding positions get 0; they are masked out anyway.
    """
    valid = torch.ones_like(token_type_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
    is_vision = (token_type_ids == VISION_TOKEN_TYPE) & valid
    prev = F.pad(is_vision[:, :-1], (1, 0), value=False)
    prev2 = F.pad(is_vision[:, :-2], (2, 0), value=False)
    nxt = F.pad(is_vision[:, 1:], (0, 1), value=False)
    # A vision token repeats the previous position when it is a patch after the first one: it is preceded by boi
    # and a patch (prev, prev2) and is not eoi (nxt).
    shares_position = is_vision & prev & prev2 & nxt
    increments = (valid & ~shares_position).long()
    return ((increments.cumsum(-1) - 1).clamp(min=0)) * valid
