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


def sparse_reference(
    q: Tensor, k: Tensor, v: Tensor, fq: Tensor, fk: Tensor, gamma: Tensor, spec: AttentionSpec,
    valid: Tensor | None = None, log_decay: Tensor | None = None,
) -> Tensor:
    """Hybrid attention with a sparse cache of ``spec.sparse`` pairs (:mod:`lolcats.ops.sparse`) by its
    definition: token by token, one row and one key/value head at a time, with explicit sets of token indices.
    Slow; the definition the sparse forms are tested against. Same arguments as
    :func:`hybrid_attention_reference`; outputs at padding queries are zeros."""
    b, h, t, _ = q.shape
    hkv = k.shape[1]
    groups, size, chunk = h // hkv, spec.sparse, spec.chunk_size
    first = first_real_index(valid, b, q.device).tolist()
    real = torch.ones(b, t, dtype=torch.bool) if valid is None else valid.cpu()
    lam = torch.ones(h, dtype=q.dtype) if log_decay is None else log_decay.to(q.dtype).exp()
    rows = []
    for row in range(b):
        def pos(j: int, row: int = row) -> int:
            return j - first[row]

        def in_window(i: int, j: int) -> bool:
            return bool(spec.shape.window(torch.tensor(pos(i)), torch.tensor(pos(j))))

        sinks = [j for j in range(t) if real[row, j] and 0 <= pos(j) < spec.sinks]
        outs = [None] * h
        for g in range(hkv):
            heads = range(g * groups, (g + 1) * groups)
            cache: list[tuple[float, int]] = []  # (score when stored, token index)
            evicted: list[int] = []  # in the linear state
            decided: set[int] = set()
            ys: dict[int, list[Tensor]] = {hh: [] for hh in heads}
            for i in range(t):
                if i % chunk == 0 and i > 0:
                    leaving = [j for j in range(i) if real[row, j] and j not in sinks and j not in decided
                               and not in_window(i - 1, j)]
                    if leaving:
                        errors = torch.zeros(len(leaving), dtype=q.dtype)
                        for hh in heads:
                            ages = torch.tensor([i - 1 - e for e in evicted], dtype=q.dtype)
                            w = lam[hh] ** ages
                            s_h = (fk[row, hh, evicted] * w[:, None]).T @ v[row, g, evicted]  # (F, Dv)
                            z_h = (fk[row, hh, evicted] * w[:, None]).sum(0)
                            for n, j in enumerate(leaving):
                                den = z_h @ fk[row, hh, j]
                                read = fk[row, hh, j] @ s_h / den if den > 0 else torch.zeros_like(v[row, g, j])
                                errors[n] += (v[row, g, j] - read).norm().detach() / groups
                        pool = cache + [(float(e), j) for e, j in zip(errors, leaving, strict=True)]
                        pool.sort(key=lambda sj: (-sj[0], sj[1]))
                        cache, evicted = pool[:size], evicted + [j for _, j in pool[size:]]
                        decided |= set(leaving)
                exact = [j for j in sinks if pos(j) <= pos(i)] + [j for _, j in cache]
                exact += [j for j in range(i + 1) if real[row, j] and j not in sinks and j not in decided]
                for hh in heads:
                    num = torch.zeros_like(v[row, g, 0])
                    den = torch.zeros((), dtype=q.dtype)
                    if exact and real[row, i]:
                        s = (k[row, g, exact] @ q[row, hh, i]) * spec.scale
                        a = gamma[hh].to(q.dtype) * torch.exp(s - s.max())
                        num, den = a @ v[row, g, exact], a.sum()
                    if evicted and real[row, i]:
                        ages = torch.tensor([i - e for e in evicted], dtype=q.dtype)
                        lw = (fk[row, hh, evicted] @ fq[row, hh, i]) * lam[hh] ** ages
                        num, den = num + lw @ v[row, g, evicted], den + lw.sum()
                    ys[hh].append(num / den if den > 0 else num * 0)
            for hh in heads:
                outs[hh] = torch.stack(ys[hh])
        rows.append(torch.stack(outs))
    return torch.stack(rows)
