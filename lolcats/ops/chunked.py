"""O(T) chunked form of hybrid attention.

Queries are split into chunks of C tokens. For a chunk starting at t0, every key older than the
variant's look-back (w−1 for sliding_window, 2w−1 for terraced, 0 for linear) is in the linear part
for every query of the chunk, so it enters through a running state S = Σ φ_k(k) vᵀ, z = Σ φ_k(k).
Keys in the look-back and the chunk itself ("near" keys) are scored exactly with the shared masks.
Time and memory are O(T · (C + look-back)).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from lolcats.ops.masks import first_real_index, lookback, window_and_linear_masks
from lolcats.ops.reference import combine, repeat_kv


def _near(x: Tensor, n_chunks: int, chunk: int, n_prev: int) -> Tensor:
    """(B, H, (n_prev + N) * C, ...) -> (B, H, N, (n_prev + 1) * C, ...): each chunk with its predecessors."""
    shape = x.shape
    x = x.reshape(*shape[:2], n_prev + n_chunks, chunk, *shape[3:])
    return torch.cat([x[:, :, i : i + n_chunks] for i in range(n_prev + 1)], dim=3)


def hybrid_attention_chunked(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    fq: Tensor,
    fk: Tensor,
    gamma: Tensor,
    *,
    variant: str,
    window_size: int,
    scale: float,
    valid: Tensor | None = None,
    chunk_size: int = 64,
) -> Tensor:
    """Same inputs and output as :func:`lolcats.ops.reference.hybrid_attention_reference`, in O(T)."""
    b, h, t, _ = q.shape
    dv = v.shape[-1]
    groups = h // k.shape[1]
    c = chunk_size
    n = math.ceil(t / c)
    back = lookback(variant, window_size)
    if variant == "terraced" and valid is None:
        # Blocks start at position 0 for every row, so a chunk starting at t0 sees window keys back to
        # the start of the block before t0's: at most w + (t0 mod w) <= 2w - gcd(C, w) tokens.
        back = 2 * window_size - math.gcd(c, window_size)
    n_prev = math.ceil(back / c)
    pad = n * c - t
    device = q.device

    first = first_real_index(valid, b, device)
    if valid is None:
        valid = torch.ones(b, t, dtype=torch.bool, device=device)
    valid = F.pad(valid, (0, pad), value=False)
    pos = torch.arange(n * c, device=device) - first[:, None]  # (B, N*C)

    k, v = repeat_kv(k, groups), repeat_kv(v, groups)
    q, k, v, fq, fk = (F.pad(x, (0, 0, 0, pad)) for x in (q, k, v, fq, fk))
    fk = fk * valid[:, None, :, None].to(fk.dtype)  # padding never enters a state

    # Far keys: chunks <= n - n_prev - 1, summarised by an exclusive running sum of chunk states.
    fk_c = fk.view(b, h, n, c, -1)
    v_c = v.view(b, h, n, c, dv)
    kv_c = fk_c.transpose(-1, -2) @ v_c  # (B, H, N, F, Dv)
    z_c = fk_c.sum(3)  # (B, H, N, F)
    # kv_far[n] = Σ_{m <= n - n_prev - 1} kv_c[m]: one matmul with a shifted lower-triangular matrix
    # (faster than cumsum + pad on CPU, same sums).
    f = fk.shape[-1]
    far = torch.ones(n, n, dtype=kv_c.dtype, device=device).tril(-(n_prev + 1))
    kv_far = (far @ kv_c.reshape(b, h, n, f * dv)).view(b, h, n, f, dv)
    z_far = far @ z_c
    fq_c = fq.view(b, h, n, c, -1)
    far_num = fq_c @ kv_far  # (B, H, N, C, Dv)
    far_den = fq_c @ z_far.unsqueeze(-1)  # (B, H, N, C, 1)

    # Near keys: the chunk and its n_prev predecessors, scored exactly.
    front = n_prev * c

    def with_front(x: Tensor) -> Tensor:
        return F.pad(x, (0, 0, front, 0))

    k_near = _near(with_front(k), n, c, n_prev)  # (B, H, N, K, D)
    v_near = _near(with_front(v), n, c, n_prev)
    fk_near = _near(with_front(fk), n, c, n_prev)
    valid_near = _near(F.pad(valid, (front, 0), value=False)[:, None], n, c, n_prev)[:, 0]  # (B, N, K)
    pos_near = _near(F.pad(pos, (front, 0), value=-1)[:, None], n, c, n_prev)[:, 0]

    win, lin = window_and_linear_masks(pos.view(b, n, c), pos_near, variant, window_size)  # (B, N, C, K)
    win = (win & valid_near[:, :, None, :])[:, None]
    lin = (lin & valid_near[:, :, None, :])[:, None]
    q_c = q.view(b, h, n, c, -1)
    scores = (q_c @ k_near.transpose(-1, -2)) * scale
    scores = scores.masked_fill(~win, float("-inf"))
    lin_weights = (fq_c @ fk_near.transpose(-1, -2)) * lin
    y = combine(scores, lin_weights, v_near, gamma.view(1, h, 1, 1, 1).to(q.dtype), far_num, far_den)
    return y.reshape(b, h, n * c, dv)[:, :, :t]
