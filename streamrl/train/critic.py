"""The PPO critic: an HF decoder with a scalar value head, and the per-response-token values it predicts.

It lives in the same FSDP rank actor as the policy (a second model with its own optimizer). V[i, j] is the value
of the state before response token j of sample i, read from the hidden state at position p−1+j (the position whose
logits predict token j), so values line up with log-probs token for token.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from transformers import AutoModelForCausalLM

from streamrl.algos.logprobs import gather_positions, pack_responses


class ValueModel(nn.Module):
    """`backbone` = the decoder of an AutoModelForCausalLM (its `.model`), `value_head` = Linear(hidden, 1).

    The head starts at zero (V ≡ 0 before training), so the first GAE advantages are the discounted rewards.
    """

    def __init__(self, causal_lm: nn.Module):
        super().__init__()
        self.backbone = causal_lm.model
        hidden = causal_lm.config.get_text_config().hidden_size
        self.value_head = nn.Linear(hidden, 1)
        nn.init.zeros_(self.value_head.weight)
        nn.init.zeros_(self.value_head.bias)
        self.config = causal_lm.config

    @classmethod
    def from_pretrained(cls, path: str, dtype: torch.dtype = torch.float32, **kwargs: Any) -> ValueModel:
        """`kwargs`: from_pretrained's (attn_implementation)."""
        return cls(AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **kwargs))

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None, **kwargs: Any) -> Tensor:
        """[B, L] -> values [B, L] (float32). `kwargs` go to the decoder (position_ids and the boundaries of a
        packed stream); no KV cache, so that transformers reads packing from the position ids."""
        h = self.backbone(input_ids=input_ids, attention_mask=attention_mask, use_cache=False,
                          **kwargs).last_hidden_state
        return self.value_head(h).squeeze(-1).float().clone()  # not a view: FSDP hooks the output


def response_values(critic: Any, batch_tokens: list[list[int]], prompt_lengths: list[int],
                    response_lengths: list[int], pad_id: int = 0) -> tuple[Tensor, Tensor]:
    """(values [B, Rmax], response mask [B, Rmax]) for B (prompt + response) sequences, zero where padded."""
    packed = pack_responses(batch_tokens, prompt_lengths, response_lengths, pad_id)
    device = next(critic.parameters()).device
    v = critic(packed.input_ids.to(device), packed.attention_mask.to(device))
    mask = packed.mask.to(v.device)
    return gather_positions(v, packed.positions).masked_fill(~mask, 0.0), mask.to(v.dtype)
