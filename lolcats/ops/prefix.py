"""Reading a decode state without advancing it: many short continuations of one prefix (few-shot scoring).

The state is left as it is and may hold one sequence (batch 1) read by every row. :func:`attend_on_state`
is the dense fast form; its reference is :func:`lolcats.ops.attend_after`, the chunked pass that
:func:`lolcats.ops.extend_state` makes, with the state not updated.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from lolcats.ops.chunked import MIN_EXP
from lolcats.ops.reference import decay_factors, repeat_kv
from lolcats.ops.spec import AttentionSpec
from lolcats.ops.state import DecodeState, FeatureFn


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
    state: DecodeState, q: Tensor, k: Tensor, v: Tensor, fq: Tensor, gamma: Tensor, feature_k: FeatureFn,
    spec: AttentionSpec, log_decay: Tensor | None = None,
) -> Tensor:
    """Outputs of T new tokens per row on top of ``state``, which stays as it is: the same as
    :func:`lolcats.ops.attend_after` (the chunked form) for rows without padding, in one dense pass of
    O(T · (L + T)) per row — made for scoring many short continuations of one prefix (few-shot evaluation).

    ``state`` may hold one sequence (batch 1) shared by all B rows: its window and S, z are then read
    for the whole batch, never copied per row.

    Args:
        state: state after ``num_tokens`` tokens, batch 1 or B, every row past its first real token.
        q: (B, H, T, D); k: (B, Hkv, T, D); v: (B, Hkv, T, Dv); fq: (B, H, T, F). No padding.
        gamma: (H,) window factor.
        feature_k: φ_k, applied to the keys that fall in the linear part.
        spec: window shape, scale and sink tokens.
        log_decay: log λ per head (H,), or None.

    Returns:
        (B, H, T, Dv) in the state's dtype.
    """
    b, h, t, _ = q.shape
    groups = h // k.shape[1]
    sdt = state.kv.dtype
    device = q.device
    if not state.started():
        raise ValueError("attend_on_state needs a state that has seen a real token; use attend_after")
    # Keys: the L window slots (w_*), then the T new tokens (o_*). Real positions count from each row's
    # first real token; masks are (Bs, 1, T, ·), the same for every head.
    n0, slots = state.num_tokens, state.window_k.shape[2]
    q_pos = torch.arange(n0, n0 + t, device=device) - state.first_real[:, None]
    k_pos = torch.arange(n0 - slots, n0 + t, device=device) - state.first_real[:, None]
    win, lin = spec.masks(q_pos, k_pos)
    k_real = torch.nn.functional.pad(state.window_valid, (0, t), value=True)[:, None, :]
    win, lin = (win & k_real)[:, None], (lin & k_real)[:, None]
    win_f, lin_f = win.to(sdt), lin.to(sdt)
    bias = torch.zeros_like(win_f).masked_fill_(~win, -math.inf)  # -inf outside the window

    q, k, v, fq = (q * spec.scale).to(sdt), k.to(sdt), v.to(sdt), fq.to(sdt)
    wk, wv = state.window_k.to(sdt), state.window_v.to(sdt)
    s_w = _by_kv_head(q, wk).add_(bias[..., :slots])  # (B, H, T, L)
    s_o = _by_kv_head(q, k).add_(bias[..., slots:])  # (B, H, T, T)
    m = torch.maximum(s_w.amax(-1, keepdim=True), s_o.amax(-1, keepdim=True)) if slots else s_o.amax(-1, keepdim=True)
    if spec.sinks:  # the state's sink tokens: exact for every query (all precede it)
        s_s = _by_kv_head(q, state.sink_k.to(sdt))  # (B, H, T, s)
        s_s = s_s.masked_fill(~state.sink_valid[:, None, None, :], -math.inf)
        m = torch.maximum(m, s_s.amax(-1, keepdim=True))
    shift = torch.where(torch.isfinite(m), m, torch.zeros_like(m)) - torch.log(gamma.to(sdt)).view(1, h, 1, 1)
    ld = None if log_decay is None else log_decay.to(sdt)
    k_idx = torch.arange(n0 - slots, n0 + t, device=device)

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
            if ld is not None:
                cols = k_idx[sl][c0:c1]
                linear = linear * decay_factors(ld, torch.arange(n0 + r0, n0 + t, device=device), cols)
            a[..., r0:, c0:c1] += linear
        return a

    a_w, a_o = weights(s_w, wk, slice(0, slots)), weights(s_o, k, slice(slots, None))
    fq_state = fq
    if ld is not None:  # the state is current at token n0 - 1: λ^(r + 1) for the r-th new token
        fq_state = fq * torch.exp(torch.arange(1, t + 1, device=device, dtype=sdt) * ld.view(h, 1)).view(1, h, t, 1)
    num = fq_state @ state.kv + _by_kv_head(a_w, wv.transpose(-1, -2)) + _by_kv_head(a_o, v.transpose(-1, -2))
    den = fq_state @ state.k_sum.unsqueeze(-1) + a_w.sum(-1, keepdim=True) + a_o.sum(-1, keepdim=True)
    if spec.sinks:
        if torch.is_grad_enabled():
            a_s = torch.exp((s_s - shift).clamp(min=MIN_EXP)) * state.sink_valid[:, None, None, :].to(sdt)
        else:
            a_s = s_s.sub_(shift).clamp_(min=MIN_EXP).exp_().mul_(state.sink_valid[:, None, None, :].to(sdt))
        num = num + _by_kv_head(a_s, state.sink_v.to(sdt).transpose(-1, -2))
        den = den + a_s.sum(-1, keepdim=True)
    return num / torch.where(den > 0, den, torch.ones_like(den))
