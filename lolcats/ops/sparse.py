"""A sparse global cache on top of hybrid attention (after LoLA, arXiv 2505.23666): per layer and key/value
head, the G key/value pairs that the linear state recalls worst stay in the exact (softmax) set.

A linear state cannot hold an arbitrary token exactly (a passkey in filler text is recalled as filler). When
a pair leaves the window it is scored by how badly the state recalls it,
``‖v_j − Sᵀφ_k(k_j) / (zᵀφ_k(k_j))‖₂`` against the state before j is added, averaged over the query heads
that read its key/value head; the score is fixed when stored. The G worst-recalled pairs stay exact under the
shared normaliser (ties go to the older pair); the others enter the linear state, each only when it is
evicted, so no token is counted twice.

**Granularity: chunks of C = ``spec.chunk_size`` tokens, counted from index 0 of the sequence.** Decisions
are made at the boundaries: before the query at index b (a multiple of C) attends, every pair that has left
the window of query b − 1 and is still undecided is scored, merged with the cache, and what the cache does not
keep folds into S and z (with decay, λ^(b−1−j)). Between boundaries, pairs that leave the window stay exact
("pending"). So query i of the chunk starting at b scores exactly: the sinks, the cache as it stood at b, and
every undecided key j ≤ i (the keys of window(b − 1) and of the chunk itself); its linear part is S, z as
they stood at b. The recurrent form (one token at a time) and the parallel form (a chunk at a time) are the
same loop over these segments, so evictions happen at the same token in both.

The parallel form is sequential over chunks (each chunk's decisions depend on the state the previous ones
left): O(T · (G + look-back + C)) time, O(G + look-back + C) keys kept — constant in T. The quadratic
definition it is tested against is :func:`lolcats.ops.reference.sparse_reference`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
from torch import Tensor

from lolcats.ops.reference import repeat_kv
from lolcats.ops.spec import AttentionSpec
from lolcats.ops.state import NOT_STARTED, FeatureFn, state_dtype


def recent_slots(spec: AttentionSpec) -> int:
    """Undecided keys a state may hold: window(b − 1) (look-back + 1 keys) plus one chunk."""
    return spec.shape.lookback + 1 + spec.chunk_size


@dataclass
class SparseState:
    """Recurrent state of one hybrid-attention layer with a sparse cache, for a batch of B sequences.

    Attributes:
        kv, k_sum: S (B, H, F, Dv) and z (B, H, F) over evicted keys, decayed to the last token consumed.
        recent_k, recent_v: (B, Hkv, R, ·), R = :func:`recent_slots`; slot r holds token ``num_tokens − R + r``.
        recent_valid: (B, R) the slot holds a real, non-sink, undecided key.
        cache_k, cache_v: (B, Hkv, G, ·) the cached pairs, per key/value head.
        cache_score: (B, Hkv, G) recall error when stored (−inf for an empty slot).
        cache_index: (B, Hkv, G) token index of each cached pair.
        cache_valid: (B, Hkv, G) the slot holds a pair.
        sink_k, sink_v, sink_valid: the sink tokens (as :class:`lolcats.ops.DecodeState`).
        first_real: (B,) index of each row's first real token (NOT_STARTED before it).
        num_tokens: tokens consumed so far, padding included.
    """

    kv: Tensor
    k_sum: Tensor
    recent_k: Tensor
    recent_v: Tensor
    recent_valid: Tensor
    cache_k: Tensor
    cache_v: Tensor
    cache_score: Tensor
    cache_index: Tensor
    cache_valid: Tensor
    sink_k: Tensor
    sink_v: Tensor
    sink_valid: Tensor
    first_real: Tensor
    num_tokens: int

    _BATCHED = ("kv", "k_sum", "recent_k", "recent_v", "recent_valid", "cache_k", "cache_v", "cache_score",
                "cache_index", "cache_valid", "sink_k", "sink_v", "sink_valid", "first_real")

    def tensors(self) -> list[Tensor]:
        return [getattr(self, name) for name in self._BATCHED]

    def started(self) -> bool:
        """Every row has seen a real token."""
        return bool((self.first_real != NOT_STARTED).all())

    def map_batch(self, fn: Callable[[Tensor], Tensor]) -> SparseState:
        """A state with ``fn`` applied to every per-sequence tensor (batch is dim 0 of each)."""
        return replace(self, **{name: fn(getattr(self, name)) for name in self._BATCHED})

    def broadcast(self, batch: int) -> SparseState:
        """A batch-1 state seen as ``batch`` copies of itself, without copying (read-only use)."""
        if self.kv.shape[0] == batch:
            return self
        if self.kv.shape[0] != 1:
            raise ValueError(f"a state of batch {self.kv.shape[0]} cannot be broadcast to {batch} rows")
        return self.map_batch(lambda x: x.expand(batch, *x.shape[1:]))


def empty_sparse_state(
    batch: int, heads: int, kv_heads: int, head_dim: int, value_dim: int, feature_dim: int, spec: AttentionSpec,
    *, dtype: torch.dtype, device: torch.device | str,
) -> SparseState:
    """State before any token; ``spec.sparse`` pairs per key/value head."""
    if spec.sparse < 1:
        raise ValueError("empty_sparse_state needs spec.sparse >= 1 (the sparse cache size G)")
    r, g, s = recent_slots(spec), spec.sparse, spec.sinks
    sdt = state_dtype(dtype)

    def zeros(*shape: int, dt: torch.dtype = dtype) -> Tensor:
        return torch.zeros(*shape, dtype=dt, device=device)

    return SparseState(
        kv=zeros(batch, heads, feature_dim, value_dim, dt=sdt), k_sum=zeros(batch, heads, feature_dim, dt=sdt),
        recent_k=zeros(batch, kv_heads, r, head_dim), recent_v=zeros(batch, kv_heads, r, value_dim),
        recent_valid=zeros(batch, r, dt=torch.bool),
        cache_k=zeros(batch, kv_heads, g, head_dim), cache_v=zeros(batch, kv_heads, g, value_dim),
        cache_score=torch.full((batch, kv_heads, g), -torch.inf, dtype=sdt, device=device),
        cache_index=zeros(batch, kv_heads, g, dt=torch.long), cache_valid=zeros(batch, kv_heads, g, dt=torch.bool),
        sink_k=zeros(batch, kv_heads, s, head_dim), sink_v=zeros(batch, kv_heads, s, value_dim),
        sink_valid=zeros(batch, s, dt=torch.bool),
        first_real=torch.full((batch,), NOT_STARTED, dtype=torch.long, device=device), num_tokens=0,
    )


def _per_query_head(x: Tensor, heads: int) -> Tensor:
    """(B, Hkv, ...) -> (B, H, ...): query head h reads key/value head h // (H / Hkv)."""
    return x.repeat_interleave(heads // x.shape[1], dim=1)


def recall_error(kv: Tensor, k_sum: Tensor, fk: Tensor, v: Tensor) -> Tensor:
    """‖v − Sᵀφ / (zᵀφ)‖₂ per query head: kv (B, H, F, Dv), k_sum (B, H, F), fk (B, H, n, F) φ_k of the keys,
    v (B, H, n, Dv) -> (B, H, n). An empty state (zᵀφ = 0) recalls zero."""
    num = fk @ kv
    den = fk @ k_sum.unsqueeze(-1)
    read = torch.where(den > 0, num / torch.where(den > 0, den, torch.ones_like(den)), torch.zeros_like(num))
    return (v - read).norm(dim=-1)


def _boundary(state: SparseState, spec: AttentionSpec, feature_k: FeatureFn, log_decay: Tensor | None) -> SparseState:
    """Decide every undecided pair that left the window of query ``num_tokens − 1``: the G worst-recalled of
    them and of the cache stay cached, the rest fold into S and z."""
    n0, r = state.num_tokens, state.recent_k.shape[2]
    device = state.kv.device
    idx = torch.arange(n0 - r, n0, device=device)
    q_pos = (n0 - 1 - state.first_real).view(-1, 1, 1)
    k_pos = (idx[None, :] - state.first_real[:, None]).unsqueeze(1)
    leaving = state.recent_valid & ~spec.shape.window(q_pos, k_pos)[:, 0]  # (B, R)
    if not bool(leaving.any()):
        return state
    b, hkv, g = state.cache_score.shape
    heads = state.kv.shape[1]
    sdt = state.kv.dtype
    keys = torch.cat([state.cache_k, state.recent_k], dim=2)  # (B, Hkv, G + R, D)
    values = torch.cat([state.cache_v, state.recent_v], dim=2)
    fk = feature_k(repeat_kv(keys, heads // hkv)).to(sdt)  # (B, H, G + R, F)
    v_rep = repeat_kv(values, heads // hkv).to(sdt)
    error = recall_error(state.kv, state.k_sum, fk[:, :, g:], v_rep[:, :, g:])  # (B, H, R)
    error = error.detach().view(b, hkv, heads // hkv, r).mean(2)  # averaged over the heads sharing a key/value head
    cand = torch.where(leaving[:, None, :], error, torch.full_like(error, -torch.inf))
    scores = torch.cat([state.cache_score.masked_fill(~state.cache_valid, -torch.inf), cand], dim=2)  # (B, Hkv, G+R)
    index = torch.cat([state.cache_index, idx.expand(b, hkv, r)], dim=2)
    # Keep the G highest scores, ties to the older pair: order by index, then (stably) by score.
    by_age = index.argsort(dim=2, stable=True)
    order = by_age.gather(2, scores.gather(2, by_age).argsort(dim=2, descending=True, stable=True))
    top = order[:, :, :g]
    live = scores > -torch.inf
    kept = torch.zeros_like(live).scatter_(2, top, True) & live
    evict = (live & ~kept).to(sdt)  # (B, Hkv, G + R)
    weight = _per_query_head(evict, heads)
    if log_decay is not None:  # S is current at index n0 − 1: a pair at j is λ^(n0 − 1 − j) old
        age = (n0 - 1 - _per_query_head(index, heads)).clamp(min=0).to(sdt)
        weight = weight * torch.exp(age * log_decay.to(sdt).view(1, heads, 1))
    fk_w = fk * weight.unsqueeze(-1)

    def pick(x: Tensor) -> Tensor:
        return x.gather(2, top.view(b, hkv, g, *([1] * (x.dim() - 3))).expand(b, hkv, g, *x.shape[3:]))

    cache_score = pick(scores)
    return replace(
        state, kv=state.kv + fk_w.transpose(-1, -2) @ v_rep, k_sum=state.k_sum + fk_w.sum(2),
        cache_k=pick(keys), cache_v=pick(values), cache_score=cache_score, cache_index=pick(index),
        cache_valid=cache_score > -torch.inf, recent_valid=state.recent_valid & ~leaving,
    )


def _attend_segment(
    state: SparseState, q: Tensor, k: Tensor, v: Tensor, fq: Tensor, gamma: Tensor, spec: AttentionSpec,
    valid: Tensor, log_decay: Tensor | None,
) -> tuple[Tensor, SparseState]:
    """Tokens inside one chunk (no boundary among them but possibly at the first): append, then attend to the
    sinks, the cache, the undecided keys and S, z."""
    from lolcats.ops.decode import _add_sinks

    b, h, t, _ = q.shape
    hkv, r = k.shape[1], state.recent_k.shape[2]
    n0 = state.num_tokens
    device = q.device
    sdt = state.kv.dtype
    starts = (state.first_real == NOT_STARTED) & valid.any(1)
    first = torch.where(starts, n0 + valid.long().argmax(1), state.first_real)
    q_idx = torch.arange(n0, n0 + t, device=device)
    q_pos = q_idx[None, :] - first[:, None]  # (B, T) real positions
    state, new_sink = _add_sinks(replace(state, first_real=first), k, v, q_pos, valid, spec)
    keys = torch.cat([state.recent_k, k.to(state.recent_k.dtype)], dim=2)  # (B, Hkv, R + T, D)
    values = torch.cat([state.recent_v, v.to(state.recent_v.dtype)], dim=2)
    k_valid = torch.cat([state.recent_valid, valid & ~new_sink], dim=1)  # (B, R + T)
    k_idx = torch.arange(n0 - r, n0 + t, device=device)
    groups = h // hkv

    def scores(x: Tensor) -> Tensor:  # (B, Hkv, K, D) -> (B, H, T, K)
        qg = (q.to(sdt) * spec.scale).reshape(b, hkv, groups * t, -1)
        return (qg @ x.to(sdt).transpose(-1, -2)).view(b, h, t, x.shape[2])

    s_recent = scores(keys).masked_fill(~(k_valid[:, None, None, :] & (k_idx[None, :] <= q_idx[:, None])),
                                        -torch.inf)
    s_cache = scores(state.cache_k).masked_fill(~_per_query_head(state.cache_valid, h)[:, :, None, :], -torch.inf)
    parts = [(s_recent, values), (s_cache, state.cache_v)]
    if spec.sinks:
        sink_ok = state.sink_valid[:, None, :] & (torch.arange(spec.sinks, device=device) <= q_pos[..., None])
        parts.append((scores(state.sink_k).masked_fill(~sink_ok[:, None], -torch.inf), state.sink_v))
    m = torch.stack([s.amax(-1) for s, _ in parts], -1).amax(-1, keepdim=True)  # (B, H, T, 1)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    g = gamma.to(sdt).view(1, h, 1, 1)
    fq_s = fq.to(sdt)
    if log_decay is not None:  # S is current at index n0 − 1: λ^(i − n0 + 1) for query i
        fq_s = fq_s * torch.exp((q_idx - n0 + 1).to(sdt) * log_decay.to(sdt).view(h, 1)).view(1, h, t, 1)
    num = fq_s @ state.kv
    den = fq_s @ state.k_sum.unsqueeze(-1)
    for s, vals in parts:
        a = g * torch.exp(s - m)
        num = num + (a.view(b, hkv, groups * t, -1) @ vals.to(sdt)).view(b, h, t, -1)
        den = den + a.sum(-1, keepdim=True)
    y = num / torch.where(den > 0, den, torch.ones_like(den))
    kv, k_sum = state.kv, state.k_sum
    if log_decay is not None:  # the state ages by T tokens
        lam_t = torch.exp(t * log_decay.to(sdt))
        kv, k_sum = kv * lam_t.view(1, h, 1, 1), k_sum * lam_t.view(1, h, 1)
    started = first != NOT_STARTED
    return y, replace(state, kv=kv, k_sum=k_sum, recent_k=keys[:, :, -r:], recent_v=values[:, :, -r:],
                      recent_valid=k_valid[:, -r:], first_real=torch.where(started, first, state.first_real),
                      num_tokens=n0 + t)


def sparse_extend(
    state: SparseState, q: Tensor, k: Tensor, v: Tensor, fq: Tensor, gamma: Tensor, feature_k: FeatureFn,
    spec: AttentionSpec, valid: Tensor | None = None, log_decay: Tensor | None = None,
) -> tuple[Tensor, SparseState]:
    """Consume T tokens on top of ``state``: one token (decode), a prompt, or a continuation.

    Args:
        state: state after ``num_tokens`` tokens (:func:`empty_sparse_state` for a new sequence).
        q: (B, H, T, D); k: (B, Hkv, T, D); v: (B, Hkv, T, Dv); fq: (B, H, T, F) φ_q of the queries.
        gamma: (H,) window factor.
        feature_k: φ_k, applied to keys repeated to H heads when they are scored or folded.
        spec: window shape, scale, chunk size (the eviction granularity), sinks and ``sparse`` = G.
        valid: (B, T) bool, False where a new token is padding.
        log_decay: log λ per head (H,), or None.

    Returns:
        ``(y, new_state)`` with y (B, H, T, Dv) in the state's dtype.
    """
    b, _, t, _ = q.shape
    if valid is None:
        valid = torch.ones(b, t, dtype=torch.bool, device=q.device)
    c = spec.chunk_size
    ys = []
    lo = 0
    while lo < t:
        n0 = state.num_tokens
        if n0 % c == 0 and n0 > 0:
            state = _boundary(state, spec, feature_k, log_decay)
        hi = min(t, lo + c - n0 % c)  # up to the next boundary
        y, state = _attend_segment(state, q[:, :, lo:hi], k[:, :, lo:hi], v[:, :, lo:hi], fq[:, :, lo:hi], gamma,
                                   spec, valid[:, lo:hi], log_decay)
        ys.append(y)
        lo = hi
    return torch.cat(ys, dim=2), state


def sparse_attention(
    q: Tensor, k: Tensor, v: Tensor, fq: Tensor, gamma: Tensor, feature_k: FeatureFn, spec: AttentionSpec,
    feature_dim: int, valid: Tensor | None = None, log_decay: Tensor | None = None,
) -> tuple[Tensor, SparseState]:
    """Hybrid attention with a sparse cache over a whole sequence (the parallel form: chunk by chunk from an
    empty state). Same arguments as :func:`sparse_extend` plus φ's width ``feature_dim``; returns
    ``(y, state)``, the state being the prompt's decode state."""
    b, h, _, d = q.shape
    state = empty_sparse_state(b, h, k.shape[1], d, v.shape[-1], feature_dim, spec, dtype=k.dtype, device=q.device)
    return sparse_extend(state, q, k, v, fq, gamma, feature_k, spec, valid, log_decay)
