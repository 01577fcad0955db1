"""The sparse global cache (lolcats.ops.sparse): the chunk-by-chunk form against the token-by-token float64
definition (outputs and gradients), token-by-token decode and continuations against the whole-sequence pass
(with left padding, sinks and decay), what the cache keeps, and a state of constant size."""

from __future__ import annotations

import pytest
import torch
from test_ops import HKV, B, D, H
from test_ops import make_inputs as inputs

from lolcats.ops import VARIANTS, AttentionSpec, hybrid_attention_reference, repeat_kv
from lolcats.ops.reference import sparse_reference
from lolcats.ops.sparse import empty_sparse_state, recall_error, sparse_attention, sparse_extend

LAMBDA = torch.tensor([0.9, 0.97, 0.99, 0.999])


def make(variant: str, window: int = 8, chunk: int = 8, size: int = 3, sinks: int = 0, decay: bool = False,
         dtype=torch.float32):
    sp = AttentionSpec(variant, window, D**-0.5, chunk, sinks=sinks, sparse=size)
    return sp, (LAMBDA.log().to(dtype) if decay else None)


def whole(q, k, v, fmap_q, fmap_k, gamma, valid, sp, ld):
    return sparse_attention(q, k, v, fmap_q(q), gamma, fmap_k, sp, fmap_k.out_dim, valid, ld)


OPTIONS = {"plain": (0, False), "sinks2": (2, False), "decay": (0, True), "sinks2+decay": (2, True)}


# every option with every window shape on one shape of input, then other lengths / chunks / sizes / no padding
CASES = [(name, variant, 45, 8, 3, 3) for name in OPTIONS for variant in VARIANTS] + [
    ("plain", "terraced", 7, 8, 2, None), ("sinks2+decay", "terraced", 61, 16, 5, None),
    ("sinks2", "sliding_window", 40, 4, 1, 3), ("decay", "sliding_window", 33, 8, 2, None)]


@pytest.mark.parametrize("name,variant,t,chunk,size,pad", CASES, ids=["-".join(map(str, c)) for c in CASES])
def test_sparse_matches_float64_definition(name, variant, t, chunk, size, pad):
    """fp32 chunk-by-chunk form vs the float64 token-by-token definition: outputs (1e-5) and gradients of q,
    k, v, γ, log λ and both feature maps (1e-4)."""
    sinks, decay = OPTIONS[name]
    q, k, v, fmap_q, fmap_k, gamma, valid = inputs(t, pad=pad or 0)
    valid = None if pad is None else valid
    ys, grads = [], []
    for dtype in (torch.float32, torch.float64):
        sp, ld = make(variant, 8, chunk, size, sinks, decay, dtype)
        leaves = [x.to(dtype).clone().requires_grad_() for x in (q, k, v, gamma)]
        ld = None if ld is None else ld.clone().requires_grad_()
        fq, fk = fmap_q.to(dtype), fmap_k.to(dtype)
        fq.zero_grad(), fk.zero_grad()
        qq, kk, vv, gg = leaves
        if dtype == torch.float32:
            y = whole(qq, kk, vv, fq, fk, gg, valid, sp, ld)[0]
        else:
            y = sparse_reference(qq, kk, vv, fq(qq), fk(repeat_kv(kk, H // HKV)), gg, sp, valid, ld)
        if valid is not None:
            y = y * valid[:, None, :, None]
        (y * torch.linspace(-1, 1, y.numel(), dtype=dtype).view_as(y)).sum().backward()
        ys.append(y.double())
        tensors = [*leaves, *([] if ld is None else [ld]), *fq.parameters(), *fk.parameters()]
        grads.append([torch.zeros_like(x).double() if x.grad is None else x.grad.double() for x in tensors])
    torch.testing.assert_close(ys[0], ys[1], atol=1e-5, rtol=1e-5)
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("variant,name", [(v, "sinks2+decay") for v in VARIANTS] + [("terraced", "plain")])
def test_decode_and_continuations_equal_the_whole_pass(variant, name):
    """Token by token, and in uneven pieces on top of a state, give the whole-sequence outputs and the same
    state (evictions at the same tokens), with left padding in one row; over many chunks."""
    sinks, decay = OPTIONS[name]
    t = 70
    q, k, v, fmap_q, fmap_k, gamma, valid = inputs(t, pad=5)
    sp, ld = make(variant, 8, 8, 3, sinks, decay)
    with torch.no_grad():
        y_all, s_all = whole(q, k, v, fmap_q, fmap_k, gamma, valid, sp, ld)
        for cuts in ([1] * t, [13, 1, 1, 22, 9, 24], [8, 16, 8, 38]):
            state = empty_sparse_state(B, H, HKV, D, D, fmap_k.out_dim, sp, dtype=q.dtype, device="cpu")
            ys, lo = [], 0
            for n in cuts:
                s = slice(lo, lo + n)
                y, state = sparse_extend(state, q[:, :, s], k[:, :, s], v[:, :, s], fmap_q(q[:, :, s]), gamma, fmap_k,
                                         sp, valid[:, s], ld)
                ys.append(y)
                lo += n
            assert lo == t
            torch.testing.assert_close(torch.cat(ys, 2) * valid[:, None, :, None], y_all * valid[:, None, :, None],
                                       atol=1e-5, rtol=1e-5)
            for a, b in zip(state.tensors(), s_all.tensors(), strict=True):
                torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_the_cache_holds_decided_real_keys_only():
    """After every chunk: the cache holds at most G pairs, none of them undecided, all real non-sink keys, and
    it is full once G keys have been decided."""
    t, chunk, size = 96, 8, 4
    q, k, v, fmap_q, fmap_k, gamma, valid = inputs(t, pad=3)
    sp, _ = make("sliding_window", 8, chunk, size, sinks=2)
    state = empty_sparse_state(B, H, HKV, D, D, fmap_k.out_dim, sp, dtype=q.dtype, device="cpu")
    with torch.no_grad():
        for lo in range(0, t, chunk):
            s = slice(lo, lo + chunk)
            _, state = sparse_extend(state, q[:, :, s], k[:, :, s], v[:, :, s], fmap_q(q[:, :, s]), gamma, fmap_k,
                                     sp, valid[:, s])
            assert int(state.cache_valid.sum(-1).max()) <= size
            n0, r = state.num_tokens, state.recent_k.shape[2]
            for row in range(B):
                first = int((~valid[row]).sum())
                real = [j for j in range(first, n0) if j - first >= 2]  # non-sink real tokens so far
                undecided = {n0 - r + i for i in range(r) if state.recent_valid[row, i]}
                for g in range(HKV):
                    cached = {int(j) for j, ok in zip(state.cache_index[row, g], state.cache_valid[row, g],
                                                      strict=True) if ok}
                    assert not cached & undecided
                    assert cached | undecided <= set(real)
                    if n0 >= 4 * chunk:  # enough keys were decided at the last boundary to fill the cache
                        assert len(cached) == size
    assert state.num_tokens == t


def test_a_key_the_state_cannot_recall_is_kept():
    """A key/value pair unlike every other (a 'passkey' among repeated filler) is in the cache at the end, and
    its recall error is the largest among the keys that left the window."""
    t = 200
    g = torch.Generator().manual_seed(1)
    filler_k, filler_v = torch.randn(1, HKV, 4, D, generator=g), torch.randn(1, HKV, 4, D, generator=g)
    k = filler_k.repeat(1, 1, t // 4, 1)
    v = filler_v.repeat(1, 1, t // 4, 1)
    k[:, :, 37], v[:, :, 37] = 3 * torch.randn(HKV, D, generator=g), 10 * torch.randn(HKV, D, generator=g)
    q = torch.randn(1, H, t, D, generator=g)
    _, _, _, fmap_q, fmap_k, gamma, _ = inputs(4)
    sp = AttentionSpec("sliding_window", 16, D**-0.5, 16, sparse=2)
    with torch.no_grad():
        _, state = sparse_attention(q, k, v, fmap_q(q), gamma[:H], fmap_k, sp, fmap_k.out_dim)
    assert (state.cache_index[0][state.cache_valid[0]] == 37).sum() == HKV  # kept by every key/value head
    err = recall_error(state.kv, state.k_sum, fmap_k(repeat_kv(k, H // HKV)), repeat_kv(v, H // HKV))
    assert int(err[0, 0, :150].argmax()) == 37


def test_a_cache_as_large_as_the_sequence_is_softmax_and_state_size_is_constant():
    """With G covering every key nothing folds: the output equals softmax attention (window covering the
    sequence in the plain hybrid). And the state's bytes do not depend on how many tokens it has seen."""
    t = 60
    q, k, v, fmap_q, fmap_k, gamma, _ = inputs(t)
    sp = AttentionSpec("sliding_window", 4, D**-0.5, 8, sparse=64)
    full = AttentionSpec("sliding_window", t, D**-0.5, 8)
    with torch.no_grad():
        y, state = whole(q, k, v, fmap_q, fmap_k, gamma, None, sp, None)
        ref = hybrid_attention_reference(q, k, v, fmap_q(q), fmap_k(repeat_kv(k, H // HKV)), gamma, full)
        torch.testing.assert_close(y, ref, atol=1e-5, rtol=1e-5)
        assert float(state.k_sum.abs().sum()) == 0.0

        def nbytes(n: int) -> int:
            st = whole(q[:, :, :n], k[:, :, :n], v[:, :, :n], fmap_q, fmap_k, gamma, None, sp, None)[1]
            return sum(x.numel() * x.element_size() for x in st.tensors())

        assert nbytes(15) == nbytes(60)


def test_the_chunked_form_refuses_a_sparse_spec():
    from lolcats.ops import hybrid_attention_chunked

    q, k, v, fmap_q, fmap_k, gamma, _ = inputs(8)
    with pytest.raises(ValueError, match="sparse"):
        hybrid_attention_chunked(q, k, v, fmap_q(q), fmap_k(repeat_kv(k, H // HKV)), gamma,
                                 AttentionSpec("terraced", 4, 1.0, 8, sparse=2))
