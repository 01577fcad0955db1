"""Quadratic reference for hybrid sliding-window + linear attention (LoLCATs, paper Eq. 7).

Materialises the full (T, T) score matrix: simple, slow, and the definition every faster form is
tested against.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lolcats.ops.masks import first_real_index
from lolcats.ops.spec import AttentionSpec


def repeat_kv(x: Tensor, groups: int) -> Tensor:
    """(B, Hkv, T, D) -> (B, Hkv * groups, T, D); query head h reads key/value head h // groups."""
    if groups == 1:
        return x
    b, h, t, d = x.shape
    return x[:, :, None].expand(b, h, groups, t, d).reshape(b, h * groups, t, d)


def decay_factors(log_decay: Tensor, q_idx: Tensor, k_idx: Tensor) -> Tensor:
    """λ^(i−j) per head for query indices i (Tq,) and key indices j (Tk,): (1, H, Tq, Tk), from log λ (H,).
    Pairs with j > i get λ^0 (they are never in the linear part)."""
    age = (q_idx[:, None] - k_idx[None, :]).clamp(min=0).to(log_decay.dtype)
    return torch.exp(age * log_decay.view(1, -1, 1, 1))


def combine(
    win_scores: Tensor, lin_weights: Tensor, v: Tensor, gamma: Tensor, extra_num: Tensor | None = None,
    extra_den: Tensor | None = None,
) -> Tensor:
    """Shared-normaliser mix of window softmax and linear weights.

    Args:
        win_scores: (..., Tq, K) scaled q·k scores with non-window pairs set to -inf.
        lin_weights: (..., Tq, K) φ_q·φ_k with non-linear pairs set to 0.
        v: (..., K, Dv) values for the same K keys.
        gamma: window factor broadcastable to (..., Tq, 1).
        extra_num, extra_den: linear contributions of keys summarised in a state,
            (..., Tq, Dv) and (..., Tq, 1).

    Returns:
        (..., Tq, Dv). Queries with no visible key (padding) give zeros.
    """
    if win_scores.shape[-1] == 0:  # nothing scored exactly (linear variant while decoding)
        c = win_scores.new_zeros(*win_scores.shape[:-1], 1)
    else:
        c = win_scores.amax(-1, keepdim=True)
        c = torch.where(torch.isfinite(c), c, torch.zeros_like(c))
    a_win = gamma * torch.exp(win_scores - c)
    num = (a_win + lin_weights) @ v
    den = a_win.sum(-1, keepdim=True) + lin_weights.sum(-1, keepdim=True)
    if extra_num is not None:
        num = num + extra_num
        den = den + extra_den
    return num / torch.where(den > 0, den, torch.ones_like(den))


def _scores_and_weights(
    q: Tensor, k: Tensor, fq: Tensor, fk: Tensor, gamma: Tensor, spec: AttentionSpec, valid: Tensor | None,
    log_decay: Tensor | None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Masked window scores and linear weights of the full (T, T) matrix, k repeated to H heads."""
    b, h, t, _ = q.shape
    k = repeat_kv(k, h // k.shape[1])
    pos = torch.arange(t, device=q.device) - first_real_index(valid, b, q.device)[:, None]  # (B, T)
    win, lin = spec.masks(pos, pos)  # (B, T, T)
    if valid is not None:
        win = win & valid[:, None, :]
        lin = lin & valid[:, None, :]
    win, lin = win[:, None], lin[:, None]  # (B, 1, T, T)
    scores = ((q @ k.transpose(-1, -2)) * spec.scale).masked_fill(~win, float("-inf"))
    lin_weights = (fq @ fk.transpose(-1, -2)) * lin
    if log_decay is not None:
        idx = torch.arange(t, device=q.device)
        lin_weights = lin_weights * decay_factors(log_decay.to(q.dtype), idx, idx)
    return scores, lin_weights, gamma.view(1, h, 1, 1).to(q.dtype)


def hybrid_attention_reference(
    q: Tensor, k: Tensor, v: Tensor, fq: Tensor, fk: Tensor, gamma: Tensor, spec: AttentionSpec,
    valid: Tensor | None = None, log_decay: Tensor | None = None,
) -> Tensor:
    """Hybrid attention by the definition, O(T²) time and memory.

    Args:
        q: queries after rotary, (B, H, T, D).
        k: keys after rotary, (B, Hkv, T, D), H divisible by Hkv.
        v: values, (B, Hkv, T, Dv).
        fq: φ_q(q), (B, H, T, F).
        fk: φ_k(k) with k repeated to H heads, (B, H, T, F).
        gamma: window factor per head, sigmoid(ω), (H,).
        spec: window shape, w, scale and sink tokens.
        valid: (B, T) bool, False for padding tokens; None means all real.
        log_decay: log λ per head, (H,): key j's linear weight for query i is λ^(i−j) φ_q·φ_k. None: no decay.

    Returns:
        (B, H, T, Dv)
    """
    scores, lin_weights, g = _scores_and_weights(q, k, fq, fk, gamma, spec, valid, log_decay)
    return combine(scores, lin_weights, repeat_kv(v, q.shape[1] // v.shape[1]), g)


def hybrid_attention_weights(
    q: Tensor, k: Tensor, fq: Tensor, fk: Tensor, gamma: Tensor, spec: AttentionSpec,
    valid: Tensor | None = None, log_decay: Tensor | None = None,
) -> Tensor:
    """The normalised (B, H, T, T) attention weights of hybrid attention (rows sum to 1): for
    Hedgehog's attention cross-entropy and for inspection."""
    scores, lin_weights, g = _scores_and_weights(q, k, fq, fk, gamma, spec, valid, log_decay)
    eye = torch.eye(q.shape[2], dtype=q.dtype, device=q.device).expand(*q.shape[:2], -1, -1)
    return combine(scores, lin_weights, eye, g)
