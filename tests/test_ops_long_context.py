"""Sink tokens and decay of the linear state in every form: chunked vs float64 reference (outputs and
gradients), token-by-token decode, prefill, extend and the frozen-prefix read vs the parallel pass, with
left padding, and a constant decode state."""

from __future__ import annotations

import pytest
import torch
from test_ops import HKV, B, D, H
from test_ops import make_inputs as inputs

from lolcats.ops import (
    VARIANTS,
    AttentionSpec,
    attend_after,
    attend_on_state,
    decode_step,
    empty_state,
    extend_state,
    hybrid_attention_chunked,
    hybrid_attention_reference,
    prefill_state,
    repeat_kv,
)

LAMBDA = torch.tensor([0.9, 0.97, 0.99, 0.999])  # one decay per head, from strong to weak
OPTIONS = {"sinks4": (4, False), "decay": (0, True), "sinks4+decay": (4, True)}


def option(name: str, variant: str, window: int, chunk: int = 64, dtype=torch.float32):
    sinks, decay = OPTIONS[name]
    return AttentionSpec(variant, window, D**-0.5, chunk, sinks=sinks), (LAMBDA.log().to(dtype) if decay else None)


def parallel(q, k, v, fmap_q, fmap_k, gamma, valid, sp, ld, form=hybrid_attention_chunked):
    y = form(q, k, v, fmap_q(q), fmap_k(repeat_kv(k, H // HKV)), gamma, sp, valid, log_decay=ld)
    return y[0] if isinstance(y, tuple) else y


def stepped(q, k, v, fmap_q, fmap_k, gamma, valid, sp, ld, state=None, start=0):
    if state is None:
        state = empty_state(B, H, HKV, D, D, fmap_k.out_dim, sp, dtype=q.dtype, device=q.device)
    ys = []
    for i in range(start, q.shape[2]):
        s = slice(i, i + 1)
        y, state = decode_step(state, q[:, :, s], k[:, :, s], v[:, :, s], fmap_q(q[:, :, s]), gamma, fmap_k, sp,
                               valid[:, i], log_decay=ld)
        ys.append(y)
    return torch.cat(ys, dim=2), state


@pytest.mark.parametrize("name", OPTIONS)
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("t,chunk", [(5, 8), (50, 8), (130, 32), (100, 12)], ids=lambda x: str(x))
@pytest.mark.parametrize("pad", [None, 0, 3], ids=["nomask", "nopad", "leftpad3"])
def test_chunked_matches_float64_reference(name, variant, t, chunk, pad):
    """fp32 chunked vs float64 reference: outputs (1e-5) and gradients of q, k, v, γ, log λ and both feature
    maps (1e-4)."""
    q, k, v, fmap_q, fmap_k, gamma, valid = inputs(t, pad=min(pad or 0, t - 1))
    valid = None if pad is None else valid
    grads, ys = [], []
    for dtype, c in ((torch.float32, chunk), (torch.float64, 64)):
        sp, ld = option(name, variant, 16, c, dtype)
        leaves = [x.to(dtype).clone().requires_grad_() for x in (q, k, v, gamma)]
        ld = None if ld is None else ld.clone().requires_grad_()
        fq, fk = fmap_q.to(dtype), fmap_k.to(dtype)
        fq.zero_grad(), fk.zero_grad()
        form = hybrid_attention_chunked if dtype == torch.float32 else hybrid_attention_reference
        y = parallel(*leaves[:3], fq, fk, leaves[3], valid, sp, ld, form)
        (y * torch.linspace(-1, 1, y.numel(), dtype=dtype).view_as(y)).sum().backward()
        ys.append(y.double())
        grads.append([x.grad.double() for x in leaves] + ([ld.grad.double()] if ld is not None else [])
                     + [p.grad.double() for p in (*fq.parameters(), *fk.parameters())])
    torch.testing.assert_close(ys[0], ys[1], atol=1e-5, rtol=1e-5)
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_options_change_what_they_should():
    """Sinks and decay are different functions from the plain hybrid, and from each other; a window covering
    the sequence with sinks (and any decay) is still causal softmax attention."""
    q, k, v, fmap_q, fmap_k, gamma, valid = inputs(120)
    plain = parallel(q, k, v, fmap_q, fmap_k, gamma, None, AttentionSpec("sliding_window", 16, D**-0.5), None)
    ys = {n: parallel(q, k, v, fmap_q, fmap_k, gamma, None, *option(n, "sliding_window", 16)) for n in OPTIONS}
    for n, y in ys.items():
        torch.testing.assert_close(y[:, :, :4], plain[:, :, :4])  # the first tokens see only the window
        assert not torch.allclose(y, plain, atol=1e-3), n
    assert not torch.allclose(ys["sinks4"], ys["decay"], atol=1e-3)
    sdpa = torch.nn.functional.scaled_dot_product_attention(q, repeat_kv(k, H // HKV), repeat_kv(v, H // HKV),
                                                            is_causal=True)
    for n in OPTIONS:
        y = parallel(q, k, v, fmap_q, fmap_k, gamma, None, *option(n, "sliding_window", 128))
        torch.testing.assert_close(y, sdpa, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("name", OPTIONS)
@pytest.mark.parametrize("variant", VARIANTS)
def test_left_padded_row_equals_sequence_alone(name, variant):
    pad = 7
    q, k, v, fmap_q, fmap_k, gamma, valid = inputs(150, pad=pad)
    sp, ld = option(name, variant, 16)
    y = parallel(q, k, v, fmap_q, fmap_k, gamma, valid, sp, ld)
    alone = parallel(q[1:, :, pad:], k[1:, :, pad:], v[1:, :, pad:], fmap_q, fmap_k, gamma, None, sp, ld)
    torch.testing.assert_close(y[1:, :, pad:], alone, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("name", OPTIONS)
@pytest.mark.parametrize("variant", VARIANTS)
def test_chunked_totals_are_decayed_sums_over_real_non_sink_keys(name, variant):
    q, k, v, fmap_q, fmap_k, gamma, valid = inputs(77, pad=6, dtype=torch.float64)
    sp, ld = option(name, variant, 16, 16, torch.float64)
    fk = fmap_k(repeat_kv(k, H // HKV))
    _, (kv, k_sum) = hybrid_attention_chunked(q, k, v, fmap_q(q), fk, gamma, sp, valid, log_decay=ld)
    pos = torch.arange(77) - torch.tensor([0, 6])[:, None]
    keep = valid & ~sp.is_sink(pos)
    age = torch.ones(H, 77, dtype=torch.float64) if ld is None else torch.exp(torch.arange(76, -1, -1) * ld[:, None])
    real = fk * keep[:, None, :, None] * age[None, :, :, None]
    torch.testing.assert_close(kv, real.transpose(-1, -2) @ repeat_kv(v, H // HKV))
    torch.testing.assert_close(k_sum, real.sum(2))


@pytest.mark.parametrize("name", OPTIONS)
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("pad", [0, 11], ids=["nopad", "leftpad11"])
def test_token_by_token_decode_matches_parallel(name, variant, pad):
    """200 steps with w = 64: every step equals the parallel pass (fp32, atol 1e-5)."""
    q, k, v, fmap_q, fmap_k, gamma, valid = inputs(200, seed=1, pad=pad)
    sp, ld = option(name, variant, 64)
    with torch.no_grad():
        want = parallel(q, k, v, fmap_q, fmap_k, gamma, valid, sp, ld)
        got, state = stepped(q, k, v, fmap_q, fmap_k, gamma, valid, sp, ld)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert state.sink_k.shape[2] == sp.sinks and bool(state.sink_valid.all())  # every row has seen its sinks


@pytest.mark.parametrize("name", OPTIONS)
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("prompt", [3, 129])
def test_prefill_then_decode_matches_parallel(name, variant, prompt):
    """A prompt shorter than the sinks, inside the window, and past it: the state continues exactly."""
    q, k, v, fmap_q, fmap_k, gamma, valid = inputs(200, seed=2, pad=5)
    sp, ld = option(name, variant, 64)
    with torch.no_grad():
        want = parallel(q, k, v, fmap_q, fmap_k, gamma, valid, sp, ld)
        p = slice(0, prompt)
        fk = fmap_k(repeat_kv(k[:, :, p], H // HKV))
        fq = fmap_q(q[:, :, p])
        _, totals = hybrid_attention_chunked(q[:, :, p], k[:, :, p], v[:, :, p], fq, fk, gamma, sp, valid[:, p],
                                             log_decay=ld)
        for kw in ({}, {"totals": totals}):
            state = prefill_state(k[:, :, p], v[:, :, p], fk, sp, valid[:, p], log_decay=ld, **kw)
            got, _ = stepped(q, k, v, fmap_q, fmap_k, gamma, valid, sp, ld, state=state, start=prompt)
            torch.testing.assert_close(got, want[:, :, prompt:], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", OPTIONS)
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("pieces", [(2, 1, 100, 97), (64, 64, 72), (1, 199)], ids=lambda p: "-".join(map(str, p)))
def test_extend_state_matches_parallel_and_decode(name, variant, pieces):
    """Pieces of 1..199 tokens on a state equal the parallel pass and leave the stepped state; left padding (30)
    ends inside a later piece, so sinks arrive in different pieces for the two rows."""
    q, k, v, fmap_q, fmap_k, gamma, valid = inputs(sum(pieces), seed=4, pad=30)
    sp, ld = option(name, variant, 64)
    sp32 = option(name, variant, 64, 32)[0]
    with torch.no_grad():
        want = parallel(q, k, v, fmap_q, fmap_k, gamma, valid, sp, ld)
        _, reference_state = stepped(q, k, v, fmap_q, fmap_k, gamma, valid, sp, ld)
        state = empty_state(B, H, HKV, D, D, fmap_k.out_dim, sp, dtype=q.dtype, device=q.device)
        ys, start = [], 0
        for n in pieces:
            s = slice(start, start + n)
            y, state = extend_state(state, q[:, :, s], k[:, :, s], v[:, :, s], fmap_q(q[:, :, s]), gamma, fmap_k, sp32,
                                    valid[:, s], log_decay=ld)
            ys.append(y)
            start += n
    torch.testing.assert_close(torch.cat(ys, dim=2), want, atol=1e-5, rtol=1e-5)
    for got, ref in zip(state.tensors(), reference_state.tensors(), strict=True):
        assert got.shape == ref.shape and got.dtype == ref.dtype
        torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("name", OPTIONS)
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("prefix,t", [(2, 5), (70, 30), (200, 150)])
def test_attend_on_state_matches_parallel(name, variant, prefix, t):
    """The frozen-prefix read (dense and chunked) equals the parallel pass, the state unchanged; gradients
    of q, k, v, γ, log λ and the feature maps equal the chunked form's."""
    q, k, v, fmap_q, fmap_k, gamma, valid = inputs(prefix + t, seed=5, pad=min(prefix - 1, 9))
    sp, ld = option(name, variant, 64)
    pre, new = slice(0, prefix), slice(prefix, prefix + t)
    with torch.no_grad():
        want = parallel(q, k, v, fmap_q, fmap_k, gamma, valid, sp, ld)
        state = prefill_state(k[:, :, pre], v[:, :, pre], fmap_k(repeat_kv(k[:, :, pre], H // HKV)), sp, valid[:, pre],
                              log_decay=ld)
        before = [x.clone() for x in state.tensors()]
        args = (state, q[:, :, new], k[:, :, new], v[:, :, new], fmap_q(q[:, :, new]), gamma, fmap_k, sp)
        torch.testing.assert_close(attend_on_state(*args, log_decay=ld), want[:, :, new], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(attend_after(*args, log_decay=ld), want[:, :, new], atol=1e-5, rtol=1e-5)
        assert all(torch.equal(a, b) for a, b in zip(state.tensors(), before, strict=True))
    grads = []
    for dense in (True, False):
        leaves = [x[:, :, new].clone().requires_grad_() for x in (q, k, v)] + [gamma.clone().requires_grad_()]
        lam = None if ld is None else ld.clone().requires_grad_()
        for p in (*fmap_q.parameters(), *fmap_k.parameters()):
            p.grad = None
        out = (attend_on_state if dense else attend_after)(state, *leaves[:3], fmap_q(leaves[0]), leaves[3], fmap_k, sp,
                                                           log_decay=lam)
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        grads.append([x.grad for x in leaves] + ([lam.grad] if lam is not None else [])
                     + [p.grad for p in (*fmap_q.parameters(), *fmap_k.parameters())])
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(torch.zeros_like(b) if a is None else a, b, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("name", OPTIONS)
def test_decode_state_bytes_are_constant(name):
    q, k, v, fmap_q, fmap_k, gamma, valid = inputs(400, seed=3)
    sp, ld = option(name, "terraced", 64)
    sizes = []
    with torch.no_grad():
        for t in (130, 400):
            _, state = stepped(q[:, :, :t], k[:, :, :t], v[:, :, :t], fmap_q, fmap_k, gamma, valid, sp, ld)
            sizes.append(sum(x.numel() * x.element_size() for x in state.tensors()))
    assert sizes[0] == sizes[1]
