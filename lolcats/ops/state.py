"""The constant-size decode state of one hybrid-attention layer, and the state a prompt leaves.

The state holds S = Σ φ_k(k) vᵀ and z = Σ φ_k(k) over keys that left the softmax window (each times
λ^(age) with a decay, ages counted to the last token consumed), plus the last L keys/values (L = the
window shape's slots: w for sliding_window, 2w for terraced, 0 for linear), stored per key/value head, and
per-slot flags saying which slots still hold a real, un-folded, non-sink key. Slot s of the window holds the
token with index ``num_tokens - L + s``. Sink tokens (the first s real tokens) have slots of their own.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
from torch import Tensor

from lolcats.ops.chunked import sink_keys
from lolcats.ops.masks import first_real_index
from lolcats.ops.reference import repeat_kv
from lolcats.ops.spec import AttentionSpec

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
        window_valid: (B, L) bool, slot holds a real non-sink key still inside the window.
        first_real: (B,) index of each row's first real token (NOT_STARTED before it).
        num_tokens: tokens consumed so far, padding included.
        sink_k: (B, Hkv, s, D) keys of the sink tokens; slot p holds the token at real position p.
        sink_v: (B, Hkv, s, Dv).
        sink_valid: (B, s) bool, the sink token has been seen.
    """

    kv: Tensor
    k_sum: Tensor
    window_k: Tensor
    window_v: Tensor
    window_valid: Tensor
    first_real: Tensor
    num_tokens: int
    sink_k: Tensor
    sink_v: Tensor
    sink_valid: Tensor

    def tensors(self) -> list[Tensor]:
        return [self.kv, self.k_sum, self.window_k, self.window_v, self.window_valid, self.first_real,
                self.sink_k, self.sink_v, self.sink_valid]

    def started(self) -> bool:
        """Every row has seen a real token."""
        return bool((self.first_real != NOT_STARTED).all())

    def map_batch(self, fn: Callable[[Tensor], Tensor]) -> DecodeState:
        """A state with ``fn`` applied to every per-sequence tensor (batch is dim 0 of each)."""
        return replace(self, kv=fn(self.kv), k_sum=fn(self.k_sum), window_k=fn(self.window_k),
                       window_v=fn(self.window_v), window_valid=fn(self.window_valid), first_real=fn(self.first_real),
                       sink_k=fn(self.sink_k), sink_v=fn(self.sink_v), sink_valid=fn(self.sink_valid))

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
    batch: int, heads: int, kv_heads: int, head_dim: int, value_dim: int, feature_dim: int, spec: AttentionSpec,
    *, dtype: torch.dtype, device: torch.device | str,
) -> DecodeState:
    """State before any token."""
    slots = spec.slots
    sdt = state_dtype(dtype)
    return DecodeState(
        kv=torch.zeros(batch, heads, feature_dim, value_dim, dtype=sdt, device=device),
        k_sum=torch.zeros(batch, heads, feature_dim, dtype=sdt, device=device),
        window_k=torch.zeros(batch, kv_heads, slots, head_dim, dtype=dtype, device=device),
        window_v=torch.zeros(batch, kv_heads, slots, value_dim, dtype=dtype, device=device),
        window_valid=torch.zeros(batch, slots, dtype=torch.bool, device=device),
        first_real=torch.full((batch,), NOT_STARTED, dtype=torch.long, device=device),
        num_tokens=0,
        sink_k=torch.zeros(batch, kv_heads, spec.sinks, head_dim, dtype=dtype, device=device),
        sink_v=torch.zeros(batch, kv_heads, spec.sinks, value_dim, dtype=dtype, device=device),
        sink_valid=torch.zeros(batch, spec.sinks, dtype=torch.bool, device=device),
    )


def prefill_state(
    k: Tensor, v: Tensor, fk: Tensor, spec: AttentionSpec, valid: Tensor | None = None, *,
    first: Tensor | None = None, totals: tuple[Tensor, Tensor] | None = None, log_decay: Tensor | None = None,
) -> DecodeState:
    """State after a parallel pass over a whole prompt (from an empty state).

    Args:
        k: (B, Hkv, T, D) keys after rotary.
        v: (B, Hkv, T, Dv).
        fk: (B, H, T, F) φ_k of the keys repeated to H heads (already computed by the parallel pass).
        spec: the window shape (its slots and masks) and sink tokens.
        valid: (B, T) bool, False for padding; None means all real.
        first: (B,) index of each row's first real token if not the first True of ``valid`` (see
            :func:`lolcats.ops.hybrid_attention_chunked`).
        totals: ``(Σ λ^(T−1−j) φ_k(k_j) v_jᵀ, Σ λ^(T−1−j) φ_k(k_j))`` over every real non-sink key, as the
            chunked pass returns them: the state is then those minus the keys still in the window (at most
            the last L), not a new pass over T.
        log_decay: log λ per head (H,), or None.
    """
    b, hkv, t, _ = k.shape
    heads = fk.shape[1]
    slots = spec.slots
    device = k.device
    if valid is None:
        valid = torch.ones(b, t, dtype=torch.bool, device=device)
    if first is None:
        first = first_real_index(valid, b, device)
    pos = torch.arange(t, device=device) - first[:, None]  # (B, T)
    win, _ = spec.masks(pos[:, -1:], pos)  # wrt the last token; sinks are in every window
    win = win[:, 0] & valid
    fold = valid & ~win
    win = win & ~spec.is_sink(pos)  # the window slots hold non-sink keys only
    sdt = state_dtype(k.dtype)
    age = None
    if log_decay is not None:  # λ^(T−1−j): keys decayed to the last token
        age = torch.exp((t - 1 - torch.arange(t, device=device)).to(sdt) * log_decay.to(sdt).view(heads, 1))
    if totals is not None:  # the window holds only the last L keys: subtract them from the totals
        t0 = max(t - slots, 0)
        fk_w = (fk[:, :, t0:] * win[:, None, t0:, None].to(fk.dtype)).to(sdt)
        if age is not None:
            fk_w = fk_w * age[None, :, t0:, None]
        kv = totals[0].to(sdt) - fk_w.transpose(-1, -2) @ repeat_kv(v[:, :, t0:], heads // hkv).to(sdt)
        k_sum = totals[1].to(sdt) - fk_w.sum(2)
    else:
        fk_f = (fk * fold[:, None, :, None].to(fk.dtype)).to(sdt)
        if age is not None:
            fk_f = fk_f * age[None, :, :, None]
        v_rep = repeat_kv(v, heads // hkv).to(sdt)
        kv, k_sum = fk_f.transpose(-1, -2) @ v_rep, fk_f.sum(2)
    lead = max(slots - t, 0)

    def last_slots(x: Tensor) -> Tensor:  # (B, Hkv, T, ·) -> (B, Hkv, L, ·)
        x = x[:, :, max(t - slots, 0) :]
        return torch.nn.functional.pad(x, (0, 0, lead, 0))

    sink_k, sink_v, sink_valid = sink_keys(k, v, first, valid, spec.sinks)
    return DecodeState(
        kv=kv,
        k_sum=k_sum,
        window_k=last_slots(k),
        window_v=last_slots(v),
        window_valid=torch.nn.functional.pad(win[:, max(t - slots, 0) :], (lead, 0), value=False),
        first_real=torch.where(first < t, first, torch.full_like(first, NOT_STARTED)),
        num_tokens=t,
        sink_k=sink_k,
        sink_v=sink_v,
        sink_valid=sink_valid,
    )
