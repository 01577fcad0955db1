"""Window / linear masks and padding positions, defined once for every attention form.

Positions are *real* positions: a token's index minus the index of its row's first real
(non-padding) token. Sliding windows depend only on position differences, terraced blocks on the
positions themselves, so a left-padded row sees the same blocks as the sequence alone.
"""

from __future__ import annotations

import torch
from torch import Tensor

VARIANTS = ("sliding_window", "terraced", "linear")


def check_variant(variant: str) -> None:
    if variant not in VARIANTS:
        raise ValueError(f"unknown attention variant {variant!r}; choose one of {', '.join(VARIANTS)}")


def lookback(variant: str, window_size: int) -> int:
    """How far back (in tokens) a query may still see a key through the softmax window."""
    check_variant(variant)
    return {"sliding_window": window_size - 1, "terraced": 2 * window_size - 1, "linear": 0}[variant]


def window_slots(variant: str, window_size: int) -> int:
    """Keys a decode state keeps un-folded: w for sliding_window, 2w for terraced, 0 for linear."""
    check_variant(variant)
    return {"sliding_window": window_size, "terraced": 2 * window_size, "linear": 0}[variant]


def first_real_index(valid: Tensor | None, batch: int, device: torch.device) -> Tensor:
    """Index of each row's first real token, shape (B,). Rows without one get their length."""
    if valid is None:
        return torch.zeros(batch, dtype=torch.long, device=device)
    return (valid.long().cumsum(-1) == 0).sum(-1)


def window_and_linear_masks(
    q_pos: Tensor, k_pos: Tensor, variant: str, window_size: int
) -> tuple[Tensor, Tensor]:
    """Which (query, key) pairs use the softmax window and which the linear term (paper Eq. 7).

    Args:
        q_pos: real query positions, shape (..., Tq).
        k_pos: real key positions, shape (..., Tk), broadcastable with ``q_pos``'s leading dims.
        variant: ``sliding_window``, ``terraced`` or ``linear``.
        window_size: w.

    Returns:
        ``(window, linear)`` boolean masks of shape (..., Tq, Tk). Both are causal and disjoint.
    """
    qp = q_pos.unsqueeze(-1)
    kp = k_pos.unsqueeze(-2)
    causal = kp <= qp
    if variant == "sliding_window":
        window = causal & (qp - kp < window_size)
    elif variant == "terraced":
        q_block = torch.div(qp, window_size, rounding_mode="floor")
        k_block = torch.div(kp, window_size, rounding_mode="floor")
        window = causal & (k_block >= q_block - 1)
    elif variant == "linear":
        window = torch.zeros_like(causal)
    else:
        check_variant(variant)
    return window, causal & ~window
