"""Greedy decoding for CogVLM, with or without the KV cache, on left-padded batches.

transformers' `generate` is not used: it does not know CogVLM's token types, image inputs or position rule
(every image patch shares one position), and its cache classes change between major versions. This loop is the
reference the tests check the cache against.
"""

from __future__ import annotations

import torch


class CogVLMGenerationMixin:
    """Adds `greedy_generate` to `CogVLMForCausalLM`."""

    def prepare_inputs_for_generation(self, input_ids, **kwargs):
        # peft's PeftModelForCausalLM (task_type="CAUSAL_LM") reads this attribute when it wraps a model.
        return {"input_ids": input_ids, **kwargs}

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

        A sample stops after its first EOS (kept in the output); its later slots are pad_token_id. New tokens are
        language tokens (type 0) at positions last + 1, last + 2, ... With use_cache=False every step re-encodes the
        whole sequence (images included) and rebuilds the position ids: slow, but independent of the cache.
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
                num_logits_to_keep=1,
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
