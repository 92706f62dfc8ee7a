"""Fused projections for the static and compiled decode steps: a copy of T3's Llama backbone in
which each layer projects q, k and v in one matmul and the MLP's gate and up in one (gpt-fast's
``wqkv``): four matmuls a layer instead of seven.

Why: at batch 1 or 2 a decode step multiplies a row or two by each weight, so its time follows
the number of kernels launched (on a CPU, of ops dispatched), not the bytes read: on
``deep-narrow`` (30 layers, 64 wide) the compiled step took 0.85x the time with the
projections fused, the same tokens (docs/decode.md). The three projections of a layer read the
same input, so one matmul over their concatenated weights computes each output element from the
same products; only the order the BLAS kernel sums them in may differ (float32 logits agree with
the unfused step's within 1e-5, a test).

The fused backbone is a copy: the user's model keeps its own modules and weights, and the copy
costs one more backbone in the decode dtype. Turbo's GPT-2 already projects q, k and v in one
matmul (``c_attn``) and is left as it is.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, cast

import torch
from torch import nn
from torch.nn.utils import skip_init
from transformers.models.llama.modeling_llama import (
    ALL_ATTENTION_FUNCTIONS,
    LlamaAttention,
    LlamaMLP,
    apply_rotary_pos_emb,
    eager_attention_forward,
)

from .alignment import copy_as_given_back


def _joined(linears: list[nn.Linear]) -> nn.Linear:
    """One linear layer computing ``linears``' outputs side by side (their weights stacked)."""
    first = linears[0]
    biases: list[torch.Tensor] = [m.bias for m in linears if m.bias is not None]  # all or none
    out = sum(m.out_features for m in linears)
    w = first.weight
    # skip_init: its weights are copied in below, and nn.Linear's own initialisation would draw
    # from the caller's global generator (a fused wrapper's first unseeded generation differed)
    joined = skip_init(nn.Linear, first.in_features, out, bias=bool(biases), device=w.device, dtype=w.dtype)
    with torch.no_grad():
        joined.weight.copy_(torch.cat([m.weight for m in linears]))
        if biases:
            joined.bias.copy_(torch.cat(biases))
    return joined


class FusedLlamaAttention(LlamaAttention):
    """transformers' ``LlamaAttention`` with q, k and v from one matmul (``qkv_proj``); the rest
    of its forward is transformers' own, line for line (transformers 5.2)."""

    qkv_proj: nn.Linear
    qkv_sizes: list[int]

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None = None,
        past_key_values: Any = None,
        cache_position: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        input_shape = hidden_states.shape[:-1]
        hidden_shape = (*input_shape, -1, self.head_dim)
        q, k, v = self.qkv_proj(hidden_states).split(self.qkv_sizes, dim=-1)
        query_states = q.view(hidden_shape).transpose(1, 2)
        key_states = k.view(hidden_shape).transpose(1, 2)
        value_states = v.view(hidden_shape).transpose(1, 2)

        cos, sin = position_embeddings
        query_states, key_states = apply_rotary_pos_emb(query_states, key_states, cos, sin)
        if past_key_values is not None:
            cache_kwargs = {"sin": sin, "cos": cos, "cache_position": cache_position}
            key_states, value_states = past_key_values.update(
                key_states, value_states, self.layer_idx, cache_kwargs
            )
        attention_interface: Callable[..., Any] = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention_forward
        )
        attn_output, attn_weights = attention_interface(
            self,
            query_states,
            key_states,
            value_states,
            attention_mask,
            dropout=0.0 if not self.training else self.attention_dropout,
            scaling=self.scaling,
            **kwargs,
        )
        attn_output = attn_output.reshape(*input_shape, -1).contiguous()
        return self.o_proj(attn_output), attn_weights


class FusedLlamaMLP(LlamaMLP):
    """transformers' ``LlamaMLP`` with gate and up from one matmul (``gate_up_proj``)."""

    gate_up_proj: nn.Linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        out: torch.Tensor = self.down_proj(self.act_fn(gate) * up)
        return out


def fusable(tfmr: nn.Module) -> bool:
    """Whether ``tfmr`` has Llama layers to fuse (T3 of the standard and Multilingual models)."""
    return any(type(m) is LlamaAttention for m in tfmr.modules())


def fused_backbone(tfmr: nn.Module) -> nn.Module:
    """A copy of ``tfmr`` with every Llama layer's projections fused; ``tfmr`` itself when it has
    none (Turbo's GPT-2). The copy is in ``tfmr``'s dtype and on its device."""
    if not fusable(tfmr):
        return tfmr
    fused = copy_as_given_back(tfmr)
    for m in fused.modules():
        if type(m) is LlamaAttention:
            attn = cast(Any, m)
            qkv = [attn.q_proj, attn.k_proj, attn.v_proj]
            attn.qkv_proj, attn.qkv_sizes = _joined(qkv), [p.out_features for p in qkv]
            del attn.q_proj, attn.k_proj, attn.v_proj
            attn.__class__ = FusedLlamaAttention
        elif type(m) is LlamaMLP:
            mlp = cast(Any, m)
            mlp.gate_up_proj = _joined([mlp.gate_proj, mlp.up_proj])
            del mlp.gate_proj, mlp.up_proj
            mlp.__class__ = FusedLlamaMLP
    return fused
