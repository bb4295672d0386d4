"""Decoding for CogVLM: transformers' `generate`, and the kit's own greedy loop that the tests hold it to.

`generate` works as for any causal LM (greedy, sampling, beam search, KV cache, left-padded batches):

    out = model.generate(input_ids=ids, images=images, token_type_ids=types, attention_mask=mask, max_new_tokens=10)
    answers = out[:, ids.shape[1]:]

What it does not know about CogVLM is supplied here, in `prepare_inputs_for_generation`: the position ids follow
the CogVLM rule (every image patch shares one position, `build_position_ids`) instead of counting tokens; the images
go in with the prompt only (a cached step is a language token); `token_type_ids` are cut to the new tokens (generate
extends them with the prompt's last type, 0, which is what a generated token is).
"""

from __future__ import annotations

import torch
from transformers import GenerationMixin

from .tokens import build_position_ids


class CogVLMGenerationMixin(GenerationMixin):
    """transformers' `generate` for `CogVLMForCausalLM`, plus `greedy_generate` (the reference loop)."""

    def prepare_inputs_for_generation(self, input_ids, past_key_values=None, attention_mask=None,
                                      token_type_ids=None, images=None, position_ids=None, use_cache=True, **kwargs):
        # `position_ids` from generate count tokens (attention_mask.cumsum), which is wrong for CogVLM: recomputed.
        # peft's PeftModelForCausalLM calls this too, with the same arguments.
        past_length = past_key_values.get_seq_length() if past_key_values is not None else 0
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        positions = build_position_ids(token_type_ids, attention_mask)
        inputs = {
            "input_ids": input_ids[:, past_length:],
            "token_type_ids": token_type_ids[:, past_length:],
            "position_ids": positions[:, past_length:],
            "attention_mask": attention_mask,
            "images": images if past_length == 0 else None,  # the prompt's image features are in the cache
            "past_key_values": past_key_values,
            "use_cache": use_cache,
        }
        kwargs.pop("next_sequence_length", None)
        kwargs.pop("is_first_iteration", None)
        return {**kwargs, **inputs}

    @torch.no_grad()
    def greedy_generate(
        self,
        input_ids: torch.LongTensor,
        images: torch.Tensor | None = None,
        token_type_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        max_new_tokens: int = 32,
        eos_token_id: int | list[int] | None = None,
        pad_token_id: int | None = None,
        use_cache: bool = True,
    ) -> torch.LongTensor:
        """Greedy continuation of left-padded prompts; returns only the new tokens, [B, n <= max_new_tokens].

        The kit's own loop, independent of `generate` (the tests check one against the other). A sample stops after
        its first EOS (kept in the output); its later slots are pad_token_id. New tokens are language tokens (type 0)
        at positions last + 1, last + 2, ... With use_cache=False every step re-encodes the whole sequence (images
        included) and rebuilds the position ids: slow, but independent of the cache.
        """
        eos_token_id = self.config.eos_token_id if eos_token_id is None else eos_token_id
        pad_token_id = self.config.pad_token_id if pad_token_id is None else pad_token_id
        eos = torch.as_tensor(eos_token_id if eos_token_id is not None else [], device=input_ids.device).flatten()
        batch = input_ids.shape[0]
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if attention_mask.shape != input_ids.shape or token_type_ids.shape != input_ids.shape:
            raise ValueError("input_ids, token_type_ids and attention_mask must have the same shape [B, L].")
        if bool((attention_mask[:, -1] == 0).any()):
            raise ValueError("greedy_generate needs LEFT padding: the last column of attention_mask must be all 1.")

        finished = torch.zeros(batch, dtype=torch.bool, device=input_ids.device)
        new_tokens = []
        step_ids, step_types, step_images, cache = input_ids, token_type_ids, images, None
        for _ in range(max_new_tokens):
            out = self(
                input_ids=step_ids,
                images=step_images,
                token_type_ids=step_types,
                attention_mask=attention_mask,
                past_key_values=cache,
                use_cache=use_cache,
                logits_to_keep=1,
            )
            next_token = out.logits[:, -1].argmax(-1)
            next_token = torch.where(finished, torch.full_like(next_token, pad_token_id), next_token)
            new_tokens.append(next_token)
            finished |= torch.isin(next_token, eos)
            if bool(finished.all()):
                break
            attention_mask = torch.cat((attention_mask, torch.ones_like(attention_mask[:, :1])), dim=1)
            if use_cache:
                cache = out.past_key_values
                step_ids, step_types, step_images = next_token[:, None], torch.zeros_like(next_token[:, None]), None
            else:
                input_ids = torch.cat((input_ids, next_token[:, None]), dim=1)
                token_type_ids = torch.cat((token_type_ids, torch.zeros_like(next_token[:, None])), dim=1)
                step_ids, step_types = input_ids, token_type_ids
        if not new_tokens:
            return input_ids.new_zeros(batch, 0)
        return torch.stack(new_tokens, dim=1)
