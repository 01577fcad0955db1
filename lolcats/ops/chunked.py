"""O(T) chunked form of hybrid attention.

Queries are split into chunks of C tokens. For a chunk starting at t0, every key older than the
window shape's look-back (w−1 for sliding_window, 2w−1 for terraced, 0 for linear) is in the linear part
for every query of the chunk, so it enters through a running state S = Σ φ_k(k) vᵀ, z = Σ φ_k(k).
Keys in the look-back and the chunk itself ("near" keys) are scored exactly with the shared masks.
Time and memory are O(T · (C + look-back)).

Speed (this form is the prefill of every prompt): without padding the masks are the same for every
row, so they are built once without a batch dimension; when no near key falls in the linear part
(terraced with chunks aligned to its blocks) the near φ_q·φ_k products are skipped; and when no
gradient is needed the (B, H, N, C, K) score tensor is transformed in place.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from lolcats.ops.masks import first_real_index
from lolcats.ops.reference import decay_factors, repeat_kv
from lolcats.ops.spec import AttentionSpec

MIN_EXP = -87.0  # e^-87 ≈ 1.6e-38, the smallest exponent whose power is still a normal float32


def _near(x: Tensor, n_chunks: int, chunk: int, n_prev: int, groups: int = 1, start: int = 0,
          extra: Tensor | None = None) -> Tensor:
    """(B, Hkv, N * C, ...) -> (B, Hkv * groups, N - start, (n_prev + 1) * C + E, ...): each chunk from ``start``
    on after its n_prev predecessors (zeros before the first chunk), then the E entries of ``extra``
    (B, Hkv, E, ...), the same for every chunk; heads repeated ``groups`` times, in one copy."""
    b, hkv = x.shape[:2]
    rest = x.shape[3:]
    xc = x.reshape(b, hkv, 1, n_chunks, chunk, *rest).expand(b, hkv, groups, n_chunks, chunk, *rest)
    m = n_chunks - start
    e = 0 if extra is None else extra.shape[2]
    k = (n_prev + 1) * chunk
    out = x.new_empty(b, hkv, groups, m, k + e, *rest)
    for i in range(n_prev + 1):
        shift = n_prev - i  # slot i of chunk j holds chunk j - shift
        lo = min(max(shift - start, 0), m)  # output chunks before lo would read before chunk 0
        sl = slice(i * chunk, (i + 1) * chunk)
        out[:, :, :, :lo, sl] = 0
        out[:, :, :, lo:, sl] = xc[:, :, :, start + lo - shift : n_chunks - shift]
    if e:
        out[:, :, :, :, k:] = extra.reshape(extra.shape[0], hkv, 1, 1, e, *rest)
    return out.view(b, hkv * groups, m, k + e, *rest)


def _exclusive_sum(x: Tensor, skip: int, start: int = 0, log_decay: Tensor | None = None, chunk: int = 1) -> Tensor:
    """(B, H, N, ...) -> out[:, :, n - start] = Σ_{m <= n - skip} x[:, :, m] for n >= start (zeros where the
    range is empty), each term times λ^(chunk · (n − m − 1)) when ``log_decay`` (log λ per head, (H,)) is given.

    One matmul with a shifted lower-triangular matrix: faster than cumsum + pad on CPU, same sums.
    """
    b, h, n = x.shape[:3]
    if log_decay is None:
        far = torch.ones(n, n, dtype=x.dtype, device=x.device).tril(-skip)[start:]
    else:
        idx = torch.arange(n, device=x.device)
        gap = (idx[start:, None] - idx[None, :] - 1).clamp(min=0).to(x.dtype)  # (N - start, N)
        far = torch.exp(gap * chunk * log_decay.to(x.dtype).view(h, 1, 1))
        far = far * torch.ones(n, n, dtype=x.dtype, device=x.device).tril(-skip)[start:]
    return (far @ x.reshape(b, h, n, -1)).view(b, h, n - start, *x.shape[3:])


def sink_keys(k: Tensor, v: Tensor, first: Tensor, valid: Tensor, sinks: int) -> tuple[Tensor, Tensor, Tensor]:
    """The first ``sinks`` real tokens of each row of a pass: keys (B, Hkv, s, D), values (B, Hkv, s, Dv) and
    (B, s) flags (False where the row has fewer real tokens). ``first`` (B or 1,) index of each row's first
    real token, ``valid`` (B or 1, T)."""
    b, hkv, t, _ = k.shape
    idx = first[:, None] + torch.arange(sinks, device=k.device)  # (rows, s)
    inside = (idx >= 0) & (idx < t)
    idx_c = idx.clamp(0, max(t - 1, 0)).expand(b, sinks)
    ok = (inside & valid.gather(1, idx_c[: valid.shape[0]].clamp(max=valid.shape[1] - 1))).expand(b, sinks)

    def take(x: Tensor) -> Tensor:
        return x.gather(2, idx_c[:, None, :, None].expand(b, hkv, sinks, x.shape[-1]))

    return take(k), take(v), ok


def hybrid_attention_chunked(
    q: Tensor, k: Tensor, v: Tensor, fq: Tensor, fk: Tensor, gamma: Tensor, spec: AttentionSpec,
    valid: Tensor | None = None, *, log_decay: Tensor | None = None, first: Tensor | None = None,
    initial: tuple[Tensor, Tensor] | None = None, queries_from: int = 0,
    sinks: tuple[Tensor, Tensor, Tensor] | None = None,
) -> tuple[Tensor, tuple[Tensor, Tensor]]:
    """Same inputs and output as :func:`lolcats.ops.reference.hybrid_attention_reference`, in O(T), chunks of
    ``spec.chunk_size`` queries; also returns the totals a prefill turns into its decode state.

    Sink keys (``spec.sinks``) are scored in a block of their own appended to every chunk's near keys, and
    never enter a state. With ``log_decay`` the chunk states are decayed to their chunk's end and summed
    with λ^(C · chunks apart), queries scale them by λ^(offset in chunk): no (T, T) matrix.

    Four extra arguments let a pass continue a sequence whose older keys live in a decode state:

    Args:
        first: (B,) index of each row's first real token, when it is not the first True of ``valid``
            (negative when the row started before this pass). Real positions count from it.
        initial: ``(S0, z0)``, (B, H, F, Dv) and (B, H, F): keys already folded into a state (decayed to index
            ``queries_from − 1``), in the linear part of every query of this pass.
        queries_from: outputs are wanted for positions ``queries_from ..`` only (earlier positions are keys
            replayed from a decode state): whole chunks before it are skipped, and the output is
            (B, H, T - queries_from, Dv).
        sinks: ``(keys, values, flags)`` of the sequence's sink tokens, (B, Hkv, s, D), (B, Hkv, s, Dv) and
            (B, s), when some are not in this pass (the default takes them from the pass).

    Returns:
        ``(y, (kv, k_sum))``: y (B, H, T, Dv), and Σ λ^(T−1−j) φ_k(k_j) v_jᵀ (B, H, F, Dv) and Σ λ^(T−1−j) φ_k(k_j)
        (B, H, F) over every real non-sink key of the pass (``initial`` not included), so a prefill needs no
        second pass over the keys.
    """
    if spec.sparse:
        raise ValueError("hybrid_attention_chunked has no sparse cache; use lolcats.ops.sparse_attention")
    b, h, t, _ = q.shape
    dv = v.shape[-1]
    groups = h // k.shape[1]
    c = spec.chunk_size
    n = math.ceil(t / c)
    if first is not None and valid is None:
        valid = torch.ones(b, t, dtype=torch.bool, device=q.device)
    # Without padding every row's positions count from index 0, which some shapes can use.
    back = spec.shape.lookback if valid is not None else spec.shape.aligned_lookback(c)
    n_prev = math.ceil(back / c)
    pad = n * c - t
    device = q.device
    grads = (q, k, v, fq, fk, gamma) + (() if log_decay is None else (log_decay,))
    inplace = not (torch.is_grad_enabled() and any(x.requires_grad for x in grads))

    # Masks over (rows, N, C, K): one row when positions and padding are the same for every row.
    if valid is None:
        rows, first = 1, torch.zeros(1, dtype=torch.long, device=device)
        valid_p = torch.ones(1, n * c, dtype=torch.bool, device=device)
    else:
        first = first_real_index(valid, b, device) if first is None else first
        if b > 1 and bool((valid == valid[:1]).all()) and bool((first == first[:1]).all()):
            valid, first = valid[:1], first[:1]  # the same for every row (copies of one state): built once
        rows = valid.shape[0]
        valid_p = F.pad(valid, (0, pad), value=False)
    pos = torch.arange(n * c, device=device) - first[:, None]  # (rows, N*C)
    s0 = min(queries_from // c, n)  # query chunks nobody wants: only chunks s0.. are computed
    valid_near = _near(valid_p[:, None], n, c, n_prev, start=s0)[:, 0]  # (rows, N - s0, K)
    pos_near = _near(pos[:, None], n, c, n_prev, start=s0)[:, 0]
    q_pos = pos.view(rows, n, c)[:, s0:]
    win, lin = spec.masks(q_pos, pos_near, sinks_apart=True)
    win = (win & valid_near[:, :, None, :])[:, None]  # (rows, 1, N - s0, C, K)
    lin = (lin & valid_near[:, :, None, :])[:, None]
    use_lin = bool(lin.any())
    k_sink = v_sink = None
    if spec.sinks:
        if sinks is None:
            sinks = sink_keys(k, v, first, valid_p[:, :t], spec.sinks)
        k_sink, v_sink, sink_ok = sinks
        sink_pos = torch.arange(spec.sinks, device=device)
        sink_win = sink_ok[:, None, None, :] & (sink_pos <= q_pos[..., None])  # (B or rows, N - s0, C, s)
        r = max(win.shape[0], sink_win.shape[0])
        win = torch.cat([win.expand(r, *win.shape[1:]), sink_win[:, None].expand(r, 1, *sink_win.shape[1:])], -1)
        not_sink = ~spec.is_sink(pos[:, :t])  # (rows, T)
        valid_p = valid_p & F.pad(not_sink, (0, pad), value=False)

    def padded(x: Tensor) -> Tensor:  # (B, ·, T, ·) -> (B, ·, N*C, ·)
        return F.pad(x, (0, 0, 0, pad)) if pad else x

    q, k, v, fq, fk = padded(q * spec.scale), padded(k), padded(v), padded(fq), padded(fk)
    if s0:
        q, fq = q[:, :, s0 * c :].contiguous(), fq[:, :, s0 * c :].contiguous()
    if valid is not None or spec.sinks:
        fk = fk * valid_p[:, None, :, None].to(fk.dtype)  # padding and sinks never enter a state

    # Far keys: chunks <= n - n_prev - 1, summarised by an exclusive running sum of chunk states.
    fk_c = fk.view(b, h, n, c, -1)
    v_c = repeat_kv(v, groups).view(b, h, n, c, dv)
    ld = None if log_decay is None else log_decay.to(q.dtype)
    if ld is not None:  # decay each key to its chunk's end: λ^(C − u) for offset u
        to_end = torch.exp((c - torch.arange(c, device=device, dtype=q.dtype)) * ld.view(h, 1))  # (H, C)
        fk_c = fk_c * to_end.view(1, h, 1, c, 1)
    kv_chunks = fk_c.transpose(-1, -2) @ v_c  # (B, H, N, F, Dv)
    z_chunks = fk_c.sum(3)  # (B, H, N, F)
    totals = _totals(kv_chunks, z_chunks, fk, v_c, ld, t, c)
    kv_far = _exclusive_sum(kv_chunks, n_prev + 1, s0, ld, c)  # (B, H, N - s0, F, Dv)
    z_far = _exclusive_sum(z_chunks, n_prev + 1, s0, ld, c)  # (B, H, N - s0, F)
    nq = n - s0  # query chunks computed
    fq_c = fq.view(b, h, nq, c, -1)
    if ld is not None:  # a query at offset r of its chunk reads the chunk-start state times λ^r
        fq_far = fq_c * torch.exp(torch.arange(c, device=device, dtype=q.dtype) * ld.view(h, 1)).view(1, h, 1, c, 1)
    else:
        fq_far = fq_c
    if initial is not None and ld is None:
        kv_far = kv_far + initial[0].to(kv_far.dtype)[:, :, None]
        z_far = z_far + initial[1].to(z_far.dtype)[:, :, None]
    num = fq_far @ kv_far  # (B, H, N, C, Dv)
    den = fq_far @ z_far.unsqueeze(-1)  # (B, H, N, C, 1)
    if initial is not None and ld is not None:  # the state is current at index queries_from - 1
        age = (torch.arange(s0 * c, n * c, device=device) - (queries_from - 1)).clamp(min=0).to(q.dtype)
        fq_init = fq_c * torch.exp(age.view(nq, c) * ld.view(h, 1, 1)).unsqueeze(-1)
        num = num + fq_init @ initial[0].to(num.dtype)[:, :, None]
        den = den + fq_init @ initial[1].to(den.dtype)[:, :, None, :, None]

    # Near keys: the chunk and its n_prev predecessors, then the sinks, scored exactly (paper Eq. 7).
    k_near = _near(k, n, c, n_prev, groups, s0, k_sink)  # (B, H, N - s0, K + s, D)
    v_near = _near(v, n, c, n_prev, groups, s0, v_sink)  # (B, H, N - s0, K + s, Dv)
    scores = q.view(b, h, nq, c, -1) @ k_near.transpose(-1, -2)  # (B, H, N - s0, C, K + s)
    scores = scores.masked_fill_(~win, -math.inf) if inplace else scores.masked_fill(~win, -math.inf)
    m = scores.amax(-1, keepdim=True)
    # γ e^{s - m} = e^{s - (m - ln γ)}; rows with no window key (padding) keep m = 0
    shift = torch.where(torch.isfinite(m), m, torch.zeros_like(m)) - torch.log(gamma.to(q.dtype)).view(1, h, 1, 1, 1)
    # Terms below e^-87 would be subnormal floats, which CPUs multiply ~100x slower: drop them to 0.
    if inplace:
        a = scores.sub_(shift).clamp_(min=MIN_EXP).exp_().masked_fill_(~win, 0.0)
    else:
        a = torch.exp((scores - shift).clamp(min=MIN_EXP)).masked_fill(~win, 0.0)  # γ-weighted window terms
    if use_lin:
        kn = (n_prev + 1) * c
        lin_weights = fq_c @ _near(fk, n, c, n_prev, start=s0).transpose(-1, -2)  # (B, H, N - s0, C, K)
        if ld is not None:  # query r, near key u: n_prev·C + r − u tokens apart
            idx = torch.arange(kn, device=device)
            lin_weights = lin_weights * decay_factors(ld, idx[:c] + n_prev * c, idx)[:, :, None]
        if spec.sinks:
            a_near = a[..., :kn]
            a_near = a_near.addcmul_(lin_weights, lin) if inplace else a_near + lin_weights * lin
            a = a if inplace else torch.cat([a_near, a[..., kn:]], -1)
        else:
            a = a.addcmul_(lin_weights, lin) if inplace else a + lin_weights * lin
    den = den.add_(a.sum(-1, keepdim=True)) if inplace else den + a.sum(-1, keepdim=True)
    num = num.add_(a @ v_near) if inplace else num + a @ v_near
    y = num / torch.where(den > 0, den, torch.ones_like(den))
    return y.reshape(b, h, nq * c, dv)[:, :, queries_from - s0 * c : t - s0 * c], totals


def _totals(kv_chunks: Tensor, z_chunks: Tensor, fk: Tensor, v_c: Tensor, ld: Tensor | None, t: int,
            c: int) -> tuple[Tensor, Tensor]:
    """Σ over the pass's keys of λ^(T−1−j) φ_k(k_j) v_jᵀ and of λ^(T−1−j) φ_k(k_j) (plain sums without decay).
    Chunk states decayed to their chunk's end are carried to index T − 1; the last chunk, which may end
    past it, is summed directly."""
    if ld is None:
        return kv_chunks.sum(2), z_chunks.sum(2)
    b, h, n = kv_chunks.shape[:3]
    device, dtype = kv_chunks.device, kv_chunks.dtype
    ends = (torch.arange(1, n, device=device) * c).to(dtype)  # end index (exclusive) of chunks 0..N-2
    carry = torch.exp((t - 1 - ends) * ld.view(h, 1)).view(1, h, n - 1)  # λ^(T − 1 − (m+1)C)
    kv = (kv_chunks[:, :, :-1] * carry[..., None, None]).sum(2)
    z = (z_chunks[:, :, :-1] * carry[..., None]).sum(2)
    j = torch.arange((n - 1) * c, n * c, device=device)
    w = torch.exp((t - 1 - j).clamp(min=0).to(dtype) * ld.view(h, 1)).view(1, h, c, 1)  # padding keys are zero
    fk_last = fk.view(b, h, n, c, -1)[:, :, -1] * w
    return kv + fk_last.transpose(-1, -2) @ v_c[:, :, -1], z + fk_last.sum(2)
