"""The next-token loss that language-model tasks train and evaluate with."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def next_token_nll(logits: torch.Tensor, targets: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy (nats) of logits (B, T, V) against next-token targets (B, T), computed in fp32:
    the mean, the sum, or per token ("none", (B*T,))."""
    return F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1), reduction=reduction)
