"""Held-out perplexity over fixed-length windows."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from lolcats.data import Chunks


def sliding_window_mask(t: int, window: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """(1, 1, T, T) additive mask: each query sees only its last ``window`` keys (itself included)."""
    i = torch.arange(t, device=device)
    allowed = (i[None, :] <= i[:, None]) & (i[:, None] - i[None, :] < window)
    mask = torch.zeros(t, t, dtype=dtype, device=device)
    return mask.masked_fill(~allowed, torch.finfo(dtype).min)[None, None]


@torch.no_grad()
def window_nll(model: nn.Module, chunks: Chunks, attention_window: int | None = None) -> tuple[float, int]:
    """Summed next-token NLL and the number of predicted tokens over ``chunks``.

    Args:
        attention_window: evaluate a softmax model with only a sliding window of this many keys (the
            window-only baseline); None for the model as it is.
    """
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for i in range(len(chunks)):
        ids, labels = (x.to(device) for x in chunks[i])
        kwargs = {}
        if attention_window is not None:
            dtype = next(model.parameters()).dtype
            kwargs["attention_mask"] = sliding_window_mask(ids.shape[1], attention_window, dtype, device)
        logits = model(input_ids=ids, use_cache=False, **kwargs).logits.float()
        target = labels[:, 1:]
        nll = nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), target.flatten(), ignore_index=-100,
                                          reduction="sum")
        total += nll.item()
        count += int((target != -100).sum())
    return total, count


def perplexity(model: nn.Module, chunks: Chunks, attention_window: int | None = None) -> float:
    total, count = window_nll(model, chunks, attention_window)
    return math.exp(total / max(count, 1))


def gap_closure(ppl_baseline: float, ppl_model: float, ppl_original: float) -> float:
    """Log-perplexity gap closure of a model from a baseline toward the original (DESIGN.md)."""
    denom = math.log(ppl_baseline) - math.log(ppl_original)
    return (math.log(ppl_baseline) - math.log(ppl_model)) / denom if denom != 0 else float("nan")
