"""Family `gpt`: a decoder-only transformer with the Llama architecture.

RMSNorm, rotary position embeddings (HF convention: rotate halves), SwiGLU MLP,
no biases (except optional q/k/v biases, as Qwen2 has: `attention_bias`),
grouped-query attention (`n_kv_head`), optional tied embeddings,
attention through `F.scaled_dot_product_attention`. Parameter names match HF's
`LlamaForCausalLM` one to one (`model.layers.0.self_attn.q_proj.weight`, ...), so
export to that format is a rename-free copy.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from llmctl.models.kv_window import KVLayer, KVWindow
from llmctl.models.shapes import GPTConfig

KVCache = list[tuple[torch.Tensor, torch.Tensor]]


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def rotary_cos_sin(positions: torch.Tensor, head_size: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables for `positions` (B, T) -> each (B, 1, T, hs), HF Llama layout (halves repeated)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_size, 2, device=positions.device, dtype=torch.float32) / head_size))
    freqs = positions.float()[..., None] * inv_freq  # (B, T, hs/2)
    emb = torch.cat((freqs, freqs), dim=-1)  # (B, T, hs)
    return emb.cos()[:, None], emb.sin()[:, None]


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return (x * cos + _rotate_half(x) * sin).to(x.dtype)


class Attention(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_size = cfg.n_head, cfg.n_kv_head, cfg.head_size
        bias = cfg.attention_bias
        self.q_proj = nn.Linear(cfg.d_model, cfg.n_head * cfg.head_size, bias=bias)
        self.k_proj = nn.Linear(cfg.d_model, cfg.n_kv_head * cfg.head_size, bias=bias)
        self.v_proj = nn.Linear(cfg.d_model, cfg.n_kv_head * cfg.head_size, bias=bias)
        self.o_proj = nn.Linear(cfg.n_head * cfg.head_size, cfg.d_model, bias=False)
        self.dropout = cfg.dropout

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        past: "tuple[torch.Tensor, torch.Tensor] | KVLayer | None",
        mask: torch.Tensor | None,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_head, self.head_size).transpose(1, 2)  # (B, nh, T, hs)
        k = self.k_proj(x).view(B, T, self.n_kv_head, self.head_size).transpose(1, 2)  # (B, nkv, T, hs)
        v = self.v_proj(x).view(B, T, self.n_kv_head, self.head_size).transpose(1, 2)  # (B, nkv, T, hs)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if isinstance(past, KVLayer):  # a preallocated cache: written in place, no copy of the past
            k, v = past.append(k, v)  # (B, nkv, S, hs)
        elif past is not None:
            k = torch.cat((past[0], k), dim=2)  # (B, nkv, S, hs)
            v = torch.cat((past[1], v), dim=2)
        present = (k, v)
        groups = self.n_head // self.n_kv_head
        if groups > 1:
            k = k.repeat_interleave(groups, dim=1)  # (B, nh, S, hs)
            v = v.repeat_interleave(groups, dim=1)
        dropout = self.dropout if self.training else 0.0
        if mask is None:
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=T > 1)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout)
        y = y.transpose(1, 2).reshape(B, T, self.n_head * self.head_size)  # (B, T, nh*hs)
        return self.o_proj(y), present


class MLP(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        self.up_proj = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        self.down_proj = nn.Linear(cfg.d_ff, cfg.d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mlp = MLP(cfg)
        self.resid_dropout = nn.Dropout(cfg.dropout)

    def forward(self, x, cos, sin, past, mask):
        h, present = self.self_attn(self.input_layernorm(x), cos, sin, past, mask)
        x = x + self.resid_dropout(h)
        x = x + self.resid_dropout(self.mlp(self.post_attention_layernorm(x)))
        return x, present


class GPTBody(nn.Module):
    """The part HF calls `model`: embeddings, blocks, final norm."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.n_layer))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)


class GPT(nn.Module):
    accepts_kv_window = True  # `past_key_values` may be a KVWindow (the serving batch's preallocated cache)

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.config = cfg
        self.model = GPTBody(cfg)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.apply(self._init_weights)
        # GPT-2's scaled init of the projections that write into the residual stream.
        for name, p in self.named_parameters():
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                nn.init.normal_(p, mean=0.0, std=cfg.init_std / math.sqrt(2 * cfg.n_layer))

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=self.config.init_std)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    @property
    def context_length(self) -> int:
        return self.config.context_length

    def forward(
        self,
        input_ids: torch.Tensor,
        past_key_values: KVCache | KVWindow | None = None,
        position_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        use_cache: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, KVCache]:
        """Logits (B, T, V) for token ids (B, T); with use_cache also the new per-layer (k, v).

        `past_key_values` is a list of per-layer (k, v), or a `KVWindow` the new keys are written
        into (the returned (k, v) are then views of it, valid until its owner moves it).

        `attention_mask` (B, S) marks the keys (past + new) that are real tokens, for
        padded batches; causality is always applied. A padding position may always see
        itself, so its row is never fully masked (which would give NaN); real tokens never
        see padding.
        """
        B, T = input_ids.shape
        window = past_key_values if isinstance(past_key_values, KVWindow) else None
        if window is not None:
            past_len = window.length
        else:
            past_len = past_key_values[0][0].shape[2] if past_key_values else 0
        if position_ids is None:  # the same for every row: one (1, T) table, broadcast over the batch
            position_ids = torch.arange(past_len, past_len + T, device=input_ids.device)[None]
        cos, sin = rotary_cos_sin(position_ids, self.config.head_size, self.config.rope_theta)
        mask = None
        if attention_mask is not None or (past_len and T > 1):
            S = past_len + T
            causal = torch.ones(T, S, dtype=torch.bool, device=input_ids.device).tril(diagonal=past_len)  # (T, S)
            mask = causal[None, None]  # (1, 1, T, S)
            if attention_mask is not None:
                own = torch.zeros(T, S, dtype=torch.bool, device=input_ids.device)
                own[:, past_len:] = torch.eye(T, dtype=torch.bool, device=input_ids.device)  # (T, S)
                mask = (mask & attention_mask.bool()[:, None, None, :]) | own  # (B, 1, T, S)
        x = self.model.embed_tokens(input_ids)  # (B, T, C)
        presents: KVCache = []
        for i, layer in enumerate(self.model.layers):
            past = window.layer(i) if window is not None else (past_key_values[i] if past_key_values else None)
            x, present = layer(x, cos, sin, past, mask)
            presents.append(present)
        logits = self.lm_head(self.model.norm(x))  # (B, T, V)
        return (logits, presents) if use_cache else logits

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


def build_gpt(config: dict[str, Any]) -> nn.Module:
    """The decoder language model of a config dict (config.json, or a recipe's model section with vocab_size)."""
    return GPT(GPTConfig.from_dict(config))
