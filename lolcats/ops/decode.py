"""Recurrent forms on top of a decode state: a one-token step, and T tokens at once in chunked form.

Both equal the parallel pass over the whole sequence (:func:`lolcats.ops.hybrid_attention_chunked`); the
state itself is in :mod:`lolcats.ops.state`.
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import Tensor

from lolcats.ops.chunked import hybrid_attention_chunked
from lolcats.ops.masks import first_real_index
from lolcats.ops.reference import combine, repeat_kv
from lolcats.ops.spec import AttentionSpec
from lolcats.ops.state import NOT_STARTED, DecodeState, FeatureFn, prefill_state


def _fold(state: DecodeState, k: Tensor, v: Tensor, fold: Tensor, feature_k: FeatureFn,
          weight: Tensor | None = None) -> DecodeState:
    """Add keys k, v (B, Hkv, n, ·) where ``fold`` (B, n) is True to S and z, times ``weight`` (H, n) if given."""
    heads = state.kv.shape[1]
    fk = feature_k(repeat_kv(k, heads // k.shape[1])).to(state.kv.dtype)  # (B, H, n, F)
    fk = fk * fold[:, None, :, None].to(fk.dtype)
    if weight is not None:
        fk = fk * weight[None, :, :, None].to(fk.dtype)
    v = repeat_kv(v, heads // v.shape[1]).to(state.kv.dtype)
    return replace(state, kv=state.kv + fk.transpose(-1, -2) @ v, k_sum=state.k_sum + fk.sum(2))


def _add_sinks(state: DecodeState, k: Tensor, v: Tensor, pos: Tensor, valid: Tensor,
               spec: AttentionSpec) -> tuple[DecodeState, Tensor]:
    """Store the new tokens (B, Hkv, n, ·) that are sink tokens (real positions ``pos`` (B, n) below s) in the
    sink slots; returns the state and (B, n) flags of the tokens that were sinks."""
    is_sink = valid & spec.is_sink(pos)
    if not spec.sinks or not bool(is_sink.any()):
        return state, is_sink
    hit = (pos[:, :, None] == torch.arange(spec.sinks, device=pos.device)) & is_sink[:, :, None]  # (B, n, s)
    hit_f = hit.to(k.dtype)
    take = hit.any(1)  # (B, s)

    def put(old: Tensor, new: Tensor) -> Tensor:  # slot p <- the new token at position p
        picked = torch.einsum("bns,bhnd->bhsd", hit_f, new.to(hit_f.dtype)).to(old.dtype)
        return torch.where(take[:, None, :, None], picked, old)

    state = replace(state, sink_k=put(state.sink_k, k), sink_v=put(state.sink_v, v),
                    sink_valid=state.sink_valid | take)
    return state, is_sink


def decode_step(
    state: DecodeState, q: Tensor, k: Tensor, v: Tensor, fq: Tensor, gamma: Tensor, feature_k: FeatureFn,
    spec: AttentionSpec, valid: Tensor | None = None, log_decay: Tensor | None = None,
) -> tuple[Tensor, DecodeState]:
    """Consume one token: fold what leaves the window, then attend.

    Args:
        state: state after ``num_tokens`` tokens.
        q: (B, H, 1, D); k: (B, Hkv, 1, D); v: (B, Hkv, 1, Dv); fq: (B, H, 1, F).
        gamma: (H,) window factor.
        feature_k: φ_k, applied to keys when they fold into the state.
        spec: the window shape (its slots and masks), scale and sink tokens.
        valid: (B,) bool, False where this token is padding.
        log_decay: log λ per head (H,), or None.

    Returns:
        ``(y, new_state)`` with y of shape (B, H, 1, Dv).
    """
    b, h = q.shape[:2]
    hkv = k.shape[1]
    slots = spec.slots
    t = state.num_tokens
    device = q.device
    if valid is None:
        valid = torch.ones(b, dtype=torch.bool, device=device)
    first = torch.where((state.first_real == NOT_STARTED) & valid, torch.full_like(state.first_real, t),
                        state.first_real)

    # Append the new token (unless it is a sink: those have slots of their own), then find window slots that
    # the new query no longer sees.
    idx = torch.arange(t - slots, t + 1, device=device)
    pos = idx[None, :] - first[:, None]
    state, new_sink = _add_sinks(replace(state, first_real=first), k, v, pos[:, -1:], valid[:, None], spec)
    wk = torch.cat([state.window_k, k.to(state.window_k.dtype)], dim=2)  # (B, Hkv, L + 1, D)
    wv = torch.cat([state.window_v, v.to(state.window_v.dtype)], dim=2)
    wvalid = torch.cat([state.window_valid, valid[:, None] & ~new_sink], dim=1)  # (B, L + 1)
    win, _ = spec.masks(pos[:, -1:], pos)
    fold = wvalid & ~win[:, 0]  # (B, L + 1)
    if log_decay is not None:  # ages grow by one: S, z decay by λ before anything folds
        lam = log_decay.to(state.kv.dtype).exp()
        state = replace(state, kv=state.kv * lam.view(1, -1, 1, 1), k_sum=state.k_sum * lam.view(1, -1, 1))
    # Only the oldest slots can leave: 1 for sliding_window / linear, w for terraced (where most steps fold
    # none, which is worth a check; one slot is folded unchecked, its flag zeroing it).
    n_cand = spec.shape.leaving_per_step
    if n_cand == 1 or bool(fold[:, :n_cand].any()):
        weight = None
        if log_decay is not None:  # slot i holds token t - L + i: λ^(L - i) old for the new query
            ages = (slots - torch.arange(n_cand, device=device)).to(state.kv.dtype)
            weight = torch.exp(ages * log_decay.to(state.kv.dtype).view(-1, 1))
        state = _fold(state, wk[:, :, :n_cand], wv[:, :, :n_cand], fold[:, :n_cand], feature_k, weight)
    wvalid = wvalid & ~fold
    wk, wv, wvalid = wk[:, :, 1:], wv[:, :, 1:], wvalid[:, 1:]

    # Attend: softmax over the sinks and the kept window slots, plus the linear state.
    sdt = state.kv.dtype
    groups = h // hkv
    keys = torch.cat([state.sink_k.to(wk.dtype), wk], dim=2) if spec.sinks else wk
    values = torch.cat([state.sink_v.to(wv.dtype), wv], dim=2) if spec.sinks else wv
    seen = torch.cat([state.sink_valid, wvalid], dim=1) if spec.sinks else wvalid
    qg = q.to(sdt).reshape(b, hkv, groups, 1, -1)
    scores = (qg @ keys.to(sdt)[:, :, None].transpose(-1, -2)).reshape(b, h, 1, keys.shape[2]) * spec.scale
    scores = scores.masked_fill(~seen[:, None, None, :], float("-inf"))
    fq_s = fq.to(sdt)
    y = combine(
        scores,
        torch.zeros_like(scores),
        repeat_kv(values, groups).to(sdt),
        gamma.view(1, h, 1, 1).to(sdt),
        extra_num=fq_s @ state.kv,  # (B, H, 1, Dv)
        extra_den=fq_s @ state.k_sum.unsqueeze(-1),  # (B, H, 1, 1)
    )
    new_state = replace(state, window_k=wk, window_v=wv, window_valid=wvalid, num_tokens=t + 1)
    return y.to(q.dtype), new_state


def _joined_pass(
    state: DecodeState, q: Tensor, k: Tensor, v: Tensor, fq: Tensor, gamma: Tensor, feature_k: FeatureFn,
    spec: AttentionSpec, valid: Tensor | None, log_decay: Tensor | None,
) -> tuple[Tensor, tuple[Tensor, Tensor, Tensor, Tensor, Tensor], DecodeState]:
    """The chunked pass over the state's window slots put back in front of T new tokens: ``(y, joined, state)``
    with y (B, H, T, Dv), ``joined = (keys, values, fk, valid, first)`` over the L + T joined positions, and
    the state with any new sink tokens stored."""
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
    state, _ = _add_sinks(state, k, v, torch.arange(slots, slots + t, device=device) - first[:, None], valid, spec)
    joined_valid = torch.cat([state.window_valid, valid], dim=1)  # (B, L + T); sinks are never window slots
    dtype = q.dtype
    keys = torch.cat([state.window_k.to(dtype), k], dim=2)  # (B, Hkv, L + T, D)
    values = torch.cat([state.window_v.to(dtype), v], dim=2)
    fk = feature_k(repeat_kv(keys, groups))  # (B, H, L + T, F)
    queries = torch.nn.functional.pad(q, (0, 0, slots, 0))
    fqs = torch.nn.functional.pad(fq, (0, 0, slots, 0))
    sinks = (state.sink_k.to(dtype), state.sink_v.to(dtype), state.sink_valid) if spec.sinks else None
    y, _ = hybrid_attention_chunked(queries, keys, values, fqs, fk, gamma, spec, joined_valid, log_decay=log_decay,
                                    first=first, initial=(state.kv, state.k_sum), queries_from=slots, sinks=sinks)
    return y, (keys, values, fk, joined_valid, first), state


def extend_state(
    state: DecodeState, q: Tensor, k: Tensor, v: Tensor, fq: Tensor, gamma: Tensor, feature_k: FeatureFn,
    spec: AttentionSpec, valid: Tensor | None = None, log_decay: Tensor | None = None,
) -> tuple[Tensor, DecodeState]:
    """Consume T tokens at once with the chunked form: the same result as T calls of :func:`decode_step`.

    The window slots are put back in front of the new tokens as keys (their queries are zeros and
    their outputs dropped), S and z enter every query's linear part, and positions continue from the
    state's, so terraced blocks stay where they were. This is how a cached prompt prefix is continued
    without stepping token by token.

    Args:
        state: state after ``num_tokens`` tokens.
        q: (B, H, T, D); k: (B, Hkv, T, D); v: (B, Hkv, T, Dv); fq: (B, H, T, F).
        gamma: (H,) window factor.
        feature_k: φ_k, applied to the keys.
        spec: window shape, scale, chunk size and sink tokens.
        valid: (B, T) bool, False where a new token is padding.
        log_decay: log λ per head (H,), or None.

    Returns:
        ``(y, new_state)`` with y of shape (B, H, T, Dv).
    """
    t = q.shape[2]
    slots = state.window_k.shape[2]
    y, (keys, values, fk, joined_valid, first), state = _joined_pass(state, q, k, v, fq, gamma, feature_k, spec,
                                                                     valid, log_decay)
    fresh = prefill_state(keys, values, fk, spec, joined_valid, first=first, log_decay=log_decay)
    start = state.num_tokens - slots
    started = first < slots + t
    kv, k_sum = state.kv, state.k_sum
    if log_decay is not None:  # the old state ages by T tokens
        lam_t = torch.exp(t * log_decay.to(kv.dtype))
        kv, k_sum = kv * lam_t.view(1, -1, 1, 1), k_sum * lam_t.view(1, -1, 1)
    new_state = replace(
        state,
        kv=kv + fresh.kv.to(kv.dtype),
        k_sum=k_sum + fresh.k_sum.to(k_sum.dtype),
        window_k=fresh.window_k.to(state.window_k.dtype),
        window_v=fresh.window_v.to(state.window_v.dtype),
        window_valid=fresh.window_valid,
        first_real=torch.where(started, first + start, torch.full_like(first, NOT_STARTED)),
        num_tokens=state.num_tokens + t,
    )
    return y, new_state


def attend_after(
    state: DecodeState, q: Tensor, k: Tensor, v: Tensor, fq: Tensor, gamma: Tensor, feature_k: FeatureFn,
    spec: AttentionSpec, valid: Tensor | None = None, log_decay: Tensor | None = None,
) -> Tensor:
    """The outputs :func:`extend_state` gives for T new tokens, ``state`` left as it is (no new state is
    built): continuations scored against one prefix. Same arguments; returns (B, H, T, Dv)."""
    return _joined_pass(state, q, k, v, fq, gamma, feature_k, spec, valid, log_decay)[0]
