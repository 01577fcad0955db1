"""Recurrent form: a constant-size decode state and a one-token step.

The state of one layer holds S = Σ φ_k(k) vᵀ and z = Σ φ_k(k) over keys that left the softmax
window, plus the last L keys/values (L = w for sliding_window, 2w for terraced, 0 for linear),
stored per key/value head, and per-slot flags saying which slots still hold a real, un-folded key.
Slot s of the window holds the token with index ``num_tokens - L + s``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
from torch import Tensor

from lolcats.ops.chunked import MIN_EXP, hybrid_attention_chunked
from lolcats.ops.masks import first_real_index, window_and_linear_masks, window_slots
from lolcats.ops.reference import combine, repeat_kv

FeatureFn = Callable[[Tensor], Tensor]  # (B, H, n, D) keys repeated to H heads -> (B, H, n, F)
NOT_STARTED = torch.iinfo(torch.long).max // 2


@dataclass
class DecodeState:
    """Recurrent state of one hybrid-attention layer for a batch of B sequences.

    Attributes:
        kv: S, (B, H, F, Dv), accumulated in float32 or wider.
        k_sum: z, (B, H, F).
        window_k: (B, Hkv, L, D) keys of the last L tokens.
        window_v: (B, Hkv, L, Dv).
        window_valid: (B, L) bool, slot holds a real key still inside the window.
        first_real: (B,) index of each row's first real token (NOT_STARTED before it).
        num_tokens: tokens consumed so far, padding included.
    """

    kv: Tensor
    k_sum: Tensor
    window_k: Tensor
    window_v: Tensor
    window_valid: Tensor
    first_real: Tensor
    num_tokens: int

    def tensors(self) -> list[Tensor]:
        return [self.kv, self.k_sum, self.window_k, self.window_v, self.window_valid, self.first_real]

    def started(self) -> bool:
        """Every row has seen a real token."""
        return bool((self.first_real != NOT_STARTED).all())

    def map_batch(self, fn: Callable[[Tensor], Tensor]) -> DecodeState:
        """A state with ``fn`` applied to every per-sequence tensor (batch is dim 0 of each)."""
        return replace(self, kv=fn(self.kv), k_sum=fn(self.k_sum), window_k=fn(self.window_k),
                       window_v=fn(self.window_v), window_valid=fn(self.window_valid), first_real=fn(self.first_real))

    def broadcast(self, batch: int) -> DecodeState:
        """A batch-1 state seen as ``batch`` copies of itself, without copying (read-only use)."""
        if self.kv.shape[0] == batch:
            return self
        if self.kv.shape[0] != 1:
            raise ValueError(f"a state of batch {self.kv.shape[0]} cannot be broadcast to {batch} rows")
        return self.map_batch(lambda x: x.expand(batch, *x.shape[1:]))


def state_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def empty_state(
    batch: int, heads: int, kv_heads: int, head_dim: int, value_dim: int, feature_dim: int, *,
    variant: str, window_size: int, dtype: torch.dtype, device: torch.device | str,
) -> DecodeState:
    """State before any token."""
    slots = window_slots(variant, window_size)
    sdt = state_dtype(dtype)
    return DecodeState(
        kv=torch.zeros(batch, heads, feature_dim, value_dim, dtype=sdt, device=device),
        k_sum=torch.zeros(batch, heads, feature_dim, dtype=sdt, device=device),
        window_k=torch.zeros(batch, kv_heads, slots, head_dim, dtype=dtype, device=device),
        window_v=torch.zeros(batch, kv_heads, slots, value_dim, dtype=dtype, device=device),
        window_valid=torch.zeros(batch, slots, dtype=torch.bool, device=device),
        first_real=torch.full((batch,), NOT_STARTED, dtype=torch.long, device=device),
        num_tokens=0,
    )


def _fold(state: DecodeState, k: Tensor, v: Tensor, fold: Tensor, feature_k: FeatureFn) -> DecodeState:
    """Add keys k, v (B, Hkv, n, ·) where ``fold`` (B, n) is True to S and z."""
    heads = state.kv.shape[1]
    fk = feature_k(repeat_kv(k, heads // k.shape[1])).to(state.kv.dtype)  # (B, H, n, F)
    fk = fk * fold[:, None, :, None].to(fk.dtype)
    v = repeat_kv(v, heads // v.shape[1]).to(state.kv.dtype)
    return replace(state, kv=state.kv + fk.transpose(-1, -2) @ v, k_sum=state.k_sum + fk.sum(2))


def prefill_state(
    k: Tensor, v: Tensor, fk: Tensor, *, variant: str, window_size: int, valid: Tensor | None = None,
    first: Tensor | None = None, totals: list | None = None,
) -> DecodeState:
    """State after a parallel pass over a whole prompt (from an empty state).

    Args:
        k: (B, Hkv, T, D) keys after rotary.
        v: (B, Hkv, T, Dv).
        fk: (B, H, T, F) φ_k of the keys repeated to H heads (already computed by the parallel pass).
        valid: (B, T) bool, False for padding; None means all real.
        first: (B,) index of each row's first real token if not the first True of ``valid`` (see
            :func:`lolcats.ops.hybrid_attention_chunked`).
        totals: ``(Σ φ_k(k) vᵀ, Σ φ_k(k))`` over every real key, as the chunked pass returns them: the state
            is then those minus the keys still in the window (at most the last L), not a new pass over T.
    """
    b, hkv, t, _ = k.shape
    heads = fk.shape[1]
    slots = window_slots(variant, window_size)
    device = k.device
    if valid is None:
        valid = torch.ones(b, t, dtype=torch.bool, device=device)
    if first is None:
        first = first_real_index(valid, b, device)
    pos = torch.arange(t, device=device) - first[:, None]  # (B, T)
    win, _ = window_and_linear_masks(pos[:, -1:], pos, variant, window_size)  # wrt the last token
    win = win[:, 0] & valid
    fold = valid & ~win
    sdt = state_dtype(k.dtype)
    if totals is not None:  # the window holds only the last L keys: subtract them from the totals
        t0 = max(t - slots, 0)
        fk_w = (fk[:, :, t0:] * win[:, None, t0:, None].to(fk.dtype)).to(sdt)
        kv = totals[0].to(sdt) - fk_w.transpose(-1, -2) @ repeat_kv(v[:, :, t0:], heads // hkv).to(sdt)
        k_sum = totals[1].to(sdt) - fk_w.sum(2)
    else:
        fk_f = (fk * fold[:, None, :, None].to(fk.dtype)).to(sdt)
        v_rep = repeat_kv(v, heads // hkv).to(sdt)
        kv, k_sum = fk_f.transpose(-1, -2) @ v_rep, fk_f.sum(2)
    lead = max(slots - t, 0)

    def last_slots(x: Tensor) -> Tensor:  # (B, Hkv, T, ·) -> (B, Hkv, L, ·)
        x = x[:, :, max(t - slots, 0) :]
        return torch.nn.functional.pad(x, (0, 0, lead, 0))

    return DecodeState(
        kv=kv,
        k_sum=k_sum,
        window_k=last_slots(k),
        window_v=last_slots(v),
        window_valid=torch.nn.functional.pad(win[:, max(t - slots, 0) :], (lead, 0), value=False),
        first_real=torch.where(first < t, first, torch.full_like(first, NOT_STARTED)),
        num_tokens=t,
    )


def decode_step(
    state: DecodeState,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    fq: Tensor,
    gamma: Tensor,
    feature_k: FeatureFn,
    *,
    variant: str,
    window_size: int,
    scale: float,
    valid: Tensor | None = None,
) -> tuple[Tensor, DecodeState]:
    """Consume one token: fold what leaves the window, then attend.

    Args:
        state: state after ``num_tokens`` tokens.
        q: (B, H, 1, D); k: (B, Hkv, 1, D); v: (B, Hkv, 1, Dv); fq: (B, H, 1, F).
        gamma: (H,) window factor.
        feature_k: φ_k, applied to keys when they fold into the state.
        valid: (B,) bool, False where this token is padding.

    Returns:
        ``(y, new_state)`` with y of shape (B, H, 1, Dv).
    """
    b, h = q.shape[:2]
    hkv = k.shape[1]
    slots = window_slots(variant, window_size)
    t = state.num_tokens
    device = q.device
    if valid is None:
        valid = torch.ones(b, dtype=torch.bool, device=device)
    first = torch.where((state.first_real == NOT_STARTED) & valid, torch.full_like(state.first_real, t),
                        state.first_real)

    # Append the new token, then find window slots that the new query no longer sees.
    wk = torch.cat([state.window_k, k.to(state.window_k.dtype)], dim=2)  # (B, Hkv, L + 1, D)
    wv = torch.cat([state.window_v, v.to(state.window_v.dtype)], dim=2)
    wvalid = torch.cat([state.window_valid, valid[:, None]], dim=1)  # (B, L + 1)
    idx = torch.arange(t - slots, t + 1, device=device)
    pos = idx[None, :] - first[:, None]
    win, _ = window_and_linear_masks(pos[:, -1:], pos, variant, window_size)
    fold = wvalid & ~win[:, 0]  # (B, L + 1)
    # Only the oldest slots can leave: 1 for sliding_window / linear, w for terraced.
    n_cand = window_size if variant == "terraced" else 1
    state = replace(state, first_real=first)
    if variant != "terraced" or bool(fold[:, :n_cand].any()):
        state = _fold(state, wk[:, :, :n_cand], wv[:, :, :n_cand], fold[:, :n_cand], feature_k)
    wvalid = wvalid & ~fold
    wk, wv, wvalid = wk[:, :, 1:], wv[:, :, 1:], wvalid[:, 1:]

    # Attend: window softmax over the kept slots plus the linear state.
    sdt = state.kv.dtype
    groups = h // hkv
    qg = q.to(sdt).reshape(b, hkv, groups, 1, -1)
    scores = (qg @ wk.to(sdt)[:, :, None].transpose(-1, -2)).reshape(b, h, 1, slots) * scale
    scores = scores.masked_fill(~wvalid[:, None, None, :], float("-inf"))
    fq_s = fq.to(sdt)
    y = combine(
        scores,
        torch.zeros_like(scores),
        repeat_kv(wv, groups).to(sdt),
        gamma.view(1, h, 1, 1).to(sdt),
        extra_num=fq_s @ state.kv,  # (B, H, 1, Dv)
        extra_den=fq_s @ state.k_sum.unsqueeze(-1),  # (B, H, 1, 1)
    )
    new_state = replace(state, window_k=wk, window_v=wv, window_valid=wvalid, num_tokens=t + 1)
    return y.to(q.dtype), new_state


def extend_state(
    state: DecodeState,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    fq: Tensor,
    gamma: Tensor,
    feature_k: FeatureFn,
    *,
    variant: str,
    window_size: int,
    scale: float,
    valid: Tensor | None = None,
    chunk_size: int = 64,
    update: bool = True,
) -> tuple[Tensor, DecodeState]:
    """Consume T tokens at once with the chunked form: the same result as T calls of :func:`decode_step`.

    The window slots are put back in front of the new tokens as keys (their queries are zeros and
    their outputs dropped), S and z enter every query's linear part, and positions continue from the
    state's, so terraced blocks stay where they were. This is how a cached prompt prefix is reused
    (few-shot evaluation) without stepping token by token.

    Args:
        state: state after ``num_tokens`` tokens.
        q: (B, H, T, D); k: (B, Hkv, T, D); v: (B, Hkv, T, Dv); fq: (B, H, T, F).
        valid: (B, T) bool, False where a new token is padding.
        update: False to attend only, returning ``state`` itself (scoring continuations of one prefix).

    Returns:
        ``(y, new_state)`` with y of shape (B, H, T, Dv).
    """
    b, h, t, _ = q.shape
    slots = state.window_k.shape[2]
    device = q.device
    groups = h // k.shape[1]
    if valid is None:
        valid = torch.ones(b, t, dtype=torch.bool, device=device)
    # Index 0 of the joined sequence is token num_tokens - slots of the whole sequence.
    start = state.num_tokens - slots
    first = torch.where(state.first_real == NOT_STARTED, slots + first_real_index(valid, b, device),
                        state.first_real - start)
    joined_valid = torch.cat([state.window_valid, valid], dim=1)  # (B, L + T)
    dtype = q.dtype
    keys = torch.cat([state.window_k.to(dtype), k], dim=2)  # (B, Hkv, L + T, D)
    values = torch.cat([state.window_v.to(dtype), v], dim=2)
    fk = feature_k(repeat_kv(keys, groups))  # (B, H, L + T, F)
    queries = torch.nn.functional.pad(q, (0, 0, slots, 0))
    fqs = torch.nn.functional.pad(fq, (0, 0, slots, 0))
    y = hybrid_attention_chunked(
        queries, keys, values, fqs, fk, gamma, variant=variant, window_size=window_size, scale=scale,
        valid=joined_valid, chunk_size=chunk_size, first=first, initial=(state.kv, state.k_sum),
        queries_from=slots)
    if not update:
        return y, state
    fresh = prefill_state(keys, values, fk, variant=variant, window_size=window_size, valid=joined_valid,
                          first=first)
    total = state.num_tokens + t
    started = first < slots + t
    new_state = DecodeState(
        kv=state.kv + fresh.kv.to(state.kv.dtype),
        k_sum=state.k_sum + fresh.k_sum.to(state.k_sum.dtype),
        window_k=fresh.window_k.to(state.window_k.dtype),
        window_v=fresh.window_v.to(state.window_v.dtype),
        window_valid=fresh.window_valid,
        first_real=torch.where(started, first + start, torch.full_like(first, NOT_STARTED)),
        num_tokens=total,
    )
    return y, new_state


def _by_kv_head(x: Tensor, y: Tensor) -> Tensor:
    """``x @ yᵀ`` with x (B, H, T, E) per query head and y (Bs, Hkv, K, E) per key/value head, Bs 1 or B:
    query head h reads y's head h // (H / Hkv); a batch-1 y serves every row. Returns (B, H, T, K)."""
    b, h, t, e = x.shape
    hkv, n = y.shape[1], y.shape[2]
    return (x.reshape(b, hkv, (h // hkv) * t, e) @ y.transpose(-1, -2)).view(b, h, t, n)


def _bounding_box(mask: Tensor) -> tuple[int, int, int] | None:
    """(first row, first column, end column) of the smallest rectangle holding every True of ``mask``
    (…, R, C) over all leading dims (rows run to the end); None when it has none."""
    if mask.numel() == 0:
        return None
    hit = mask.reshape(-1, *mask.shape[-2:]).any(0)
    rows, cols = hit.any(-1).nonzero(), hit.any(-2).nonzero()
    if rows.numel() == 0:
        return None
    return int(rows[0]), int(cols[0]), int(cols[-1]) + 1


def attend_on_state(
    state: DecodeState,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    fq: Tensor,
    gamma: Tensor,
    feature_k: FeatureFn,
    *,
    variant: str,
    window_size: int,
    scale: float,
) -> Tensor:
    """Outputs of T new tokens per row on top of ``state``, which stays as it is: the same as
    ``extend_state(..., update=False)`` for rows without padding, in one dense pass of O(T · (L + T)) per
    row — made for scoring many short continuations of one prefix (few-shot evaluation).

    ``state`` may hold one sequence (batch 1) shared by all B rows: its window and S, z are then read
    for the whole batch, never copied per row.

    Args:
        state: state after ``num_tokens`` tokens, batch 1 or B, every row past its first real token.
        q: (B, H, T, D); k: (B, Hkv, T, D); v: (B, Hkv, T, Dv); fq: (B, H, T, F). No padding.

    Returns:
        (B, H, T, Dv) in the state's dtype.
    """
    b, h, t, _ = q.shape
    groups = h // k.shape[1]
    sdt = state.kv.dtype
    device = q.device
    if not state.started():
        raise ValueError("attend_on_state needs a state that has seen a real token; use extend_state")
    # Keys: the L window slots (w_*), then the T new tokens (o_*). Real positions count from each row's
    # first real token; masks are (Bs, 1, T, ·), the same for every head.
    n0, slots = state.num_tokens, state.window_k.shape[2]
    q_pos = torch.arange(n0, n0 + t, device=device) - state.first_real[:, None]
    k_pos = torch.arange(n0 - slots, n0 + t, device=device) - state.first_real[:, None]
    win, lin = window_and_linear_masks(q_pos, k_pos, variant, window_size)
    k_real = torch.nn.functional.pad(state.window_valid, (0, t), value=True)[:, None, :]
    win, lin = (win & k_real)[:, None], (lin & k_real)[:, None]
    win_f, lin_f = win.to(sdt), lin.to(sdt)
    bias = torch.zeros_like(win_f).masked_fill_(~win, -math.inf)  # -inf outside the window

    q, k, v, fq = (q * scale).to(sdt), k.to(sdt), v.to(sdt), fq.to(sdt)
    wk, wv = state.window_k.to(sdt), state.window_v.to(sdt)
    s_w = _by_kv_head(q, wk).add_(bias[..., :slots])  # (B, H, T, L)
    s_o = _by_kv_head(q, k).add_(bias[..., slots:])  # (B, H, T, T)
    m = torch.maximum(s_w.amax(-1, keepdim=True), s_o.amax(-1, keepdim=True)) if slots else s_o.amax(-1, keepdim=True)
    shift = torch.where(torch.isfinite(m), m, torch.zeros_like(m)) - torch.log(gamma.to(sdt)).view(1, h, 1, 1)

    def weights(s: Tensor, keys: Tensor, sl: slice) -> Tensor:
        """γ e^{s - m} inside the window (terms below e^-87 dropped: subnormal floats are slow on CPUs), plus
        φ_q·φ_k where the key is in the linear part — computed only over the rectangle of (query, key) pairs
        that holds every linear one: none while the continuation is shorter than the window, which is most
        of them."""
        if torch.is_grad_enabled():
            a = torch.exp((s - shift).clamp(min=MIN_EXP)) * win_f[..., sl]
        else:
            a = s.sub_(shift).clamp_(min=MIN_EXP).exp_().mul_(win_f[..., sl])
        box = _bounding_box(lin[..., sl])
        if box is not None:
            r0, c0, c1 = box
            phi_k = feature_k(repeat_kv(keys[:, :, c0:c1], groups)).to(sdt)
            linear = (fq[:, :, r0:] @ phi_k.transpose(-1, -2)).mul_(lin_f[..., sl][..., r0:, c0:c1])
            a[..., r0:, c0:c1] += linear
        return a

    a_w, a_o = weights(s_w, wk, slice(0, slots)), weights(s_o, k, slice(slots, None))
    num = fq @ state.kv + _by_kv_head(a_w, wv.transpose(-1, -2)) + _by_kv_head(a_o, v.transpose(-1, -2))
    den = fq @ state.k_sum.unsqueeze(-1) + a_w.sum(-1, keepdim=True) + a_o.sum(-1, keepdim=True)
    return num / torch.where(den > 0, den, torch.ones_like(den))
