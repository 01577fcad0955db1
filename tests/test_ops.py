"""The O(T) chunked form and the recurrent decode step against the quadratic reference."""

from __future__ import annotations

import pytest
import torch

from lolcats.feature_maps import build_feature_map
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

B, H, HKV, D = 2, 4, 2, 16
W = 16  # window for the op tests; the decode tests use the paper's w = 64


def make_inputs(t: int, seed: int = 0, dtype=torch.float32, pad: int = 0):
    """Random q/k/v, Hedgehog features, γ, and a validity mask with ``pad`` left-padding tokens in row 1."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, t, D, generator=g, dtype=dtype)
    k = torch.randn(B, HKV, t, D, generator=g, dtype=dtype)
    v = torch.randn(B, HKV, t, D, generator=g, dtype=dtype)
    fmap_q = build_feature_map("hedgehog", H, D, 8, "kaiming").to(dtype)
    fmap_k = build_feature_map("hedgehog", H, D, 8, "kaiming").to(dtype)
    gamma = torch.rand(H, generator=g, dtype=dtype) * 0.8 + 0.1
    valid = torch.ones(B, t, dtype=torch.bool)
    valid[1, :pad] = False
    return q, k, v, fmap_q, fmap_k, gamma, valid


def spec(variant: str, window: int = W, chunk_size: int = 64) -> AttentionSpec:
    return AttentionSpec(variant, window, D**-0.5, chunk_size)


def run(form, q, k, v, fmap_q, fmap_k, gamma, valid, variant, window=W, chunk_size=64):
    """The output of ``form`` (reference or chunked; the chunked form's totals dropped)."""
    fq, fk = fmap_q(q), fmap_k(repeat_kv(k, H // HKV))
    y = form(q, k, v, fq, fk, gamma, spec(variant, window, chunk_size), valid)
    return y[0] if isinstance(y, tuple) else y


CASES = [(1, 8), (5, 8), (W - 1, 8), (50, 8), (77, 16), (130, 32), (200, 64), (100, 12), (90, 24)]


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("t,chunk", CASES, ids=[f"T{t}-C{c}" for t, c in CASES])
@pytest.mark.parametrize("pad", [None, 0, 3], ids=["nomask", "nopad", "leftpad3"])
def test_chunked_matches_float64_reference(variant, t, chunk, pad):
    """fp32 chunked vs float64 reference: outputs within 1e-5 and gradients within 1e-4 (relative 1e-4).

    ``nomask`` (valid=None) takes the block-aligned terraced path; the others the general one."""
    q, k, v, fmap_q, fmap_k, gamma, valid = make_inputs(t, pad=min(pad or 0, t - 1))
    if pad is None:
        valid = None
    leaves32 = [x.clone().requires_grad_() for x in (q, k, v, gamma)]
    leaves64 = [x.double().clone().requires_grad_() for x in (q, k, v, gamma)]
    fq64, fk64 = fmap_q.double(), fmap_k.double()
    y = run(hybrid_attention_chunked, *leaves32[:3], fmap_q.float(), fmap_k.float(), leaves32[3], valid, variant,
            chunk_size=chunk)
    y_ref = run(hybrid_attention_reference, *leaves64[:3], fq64, fk64, leaves64[3], valid, variant)
    torch.testing.assert_close(y, y_ref.float(), atol=1e-5, rtol=1e-5)
    grad_out = torch.randn_like(y_ref)
    (y * grad_out.float()).sum().backward()
    (y_ref * grad_out).sum().backward()
    for name, a, b in zip("qkvγ", leaves32, leaves64, strict=True):
        torch.testing.assert_close(a.grad, b.grad.float(), atol=1e-4, rtol=1e-4, msg=lambda m, n=name: f"d{n}: {m}")


@pytest.mark.parametrize("variant", VARIANTS)
def test_chunked_feature_map_gradients_match_reference(variant):
    """Gradients reach the feature-map weights identically through both forms."""
    q, k, v, fmap_q, fmap_k, gamma, valid = make_inputs(90, pad=5, dtype=torch.float64)
    grads = []
    for form, kw in ((hybrid_attention_reference, {}), (hybrid_attention_chunked, {"chunk_size": 32})):
        fmap_q.zero_grad(), fmap_k.zero_grad()
        run(form, q, k, v, fmap_q, fmap_k, gamma, valid, variant, **kw).square().sum().backward()
        grads.append((fmap_q.weight.grad.clone(), fmap_k.weight.grad.clone()))
    torch.testing.assert_close(grads[0], grads[1], atol=1e-9, rtol=1e-7)
    assert grads[0][0].abs().sum() > 0


@pytest.mark.parametrize("variant", VARIANTS)
def test_left_padded_row_equals_sequence_alone(variant):
    pad = 7
    q, k, v, fmap_q, fmap_k, gamma, valid = make_inputs(150, pad=pad)
    y = run(hybrid_attention_chunked, q, k, v, fmap_q, fmap_k, gamma, valid, variant)
    alone = run(hybrid_attention_chunked, q[1:, :, pad:], k[1:, :, pad:], v[1:, :, pad:], fmap_q, fmap_k, gamma,
                None, variant)
    torch.testing.assert_close(y[1:, :, pad:], alone, atol=1e-6, rtol=1e-6)
    assert torch.all(y[1, :, :pad] == 0), "padding queries see nothing and output zeros"


def test_window_as_long_as_sequence_is_softmax_attention():
    """With w >= T no linear term remains and γ cancels: exactly causal softmax attention."""
    q, k, v, fmap_q, fmap_k, gamma, _ = make_inputs(40)
    for variant in ("sliding_window", "terraced"):
        y = run(hybrid_attention_chunked, q, k, v, fmap_q, fmap_k, gamma, None, variant, window=64)
        sdpa = torch.nn.functional.scaled_dot_product_attention(
            q, repeat_kv(k, H // HKV), repeat_kv(v, H // HKV), is_causal=True)
        torch.testing.assert_close(y, sdpa, atol=1e-6, rtol=1e-5)


def test_variants_differ_where_they_should():
    """Sanity: the three variants are different functions once T exceeds the window."""
    inputs = make_inputs(100)
    ys = {variant: run(hybrid_attention_reference, *inputs, variant) for variant in VARIANTS}
    for a in VARIANTS:
        for b in VARIANTS:
            if a < b:
                assert not torch.allclose(ys[a], ys[b], atol=1e-3)
    # within the first window all windowed variants agree
    torch.testing.assert_close(ys["sliding_window"][:, :, :W], ys["terraced"][:, :, :W])


@pytest.mark.parametrize("variant", VARIANTS)
def test_chunked_totals_are_sums_over_real_keys(variant):
    """The totals the chunked pass returns are Σ φ_k(k) vᵀ and Σ φ_k(k) over every real key (padding left out)."""
    q, k, v, fmap_q, fmap_k, gamma, valid = make_inputs(77, pad=6, dtype=torch.float64)
    fk = fmap_k(repeat_kv(k, H // HKV))
    _, (kv, k_sum) = hybrid_attention_chunked(q, k, v, fmap_q(q), fk, gamma, spec(variant, chunk_size=16), valid)
    real = fk * valid[:, None, :, None]
    torch.testing.assert_close(kv, real.transpose(-1, -2) @ repeat_kv(v, H // HKV))
    torch.testing.assert_close(k_sum, real.sum(2))


def test_window_shapes_are_registered_with_their_lookback_and_slots():
    shapes = {name: AttentionSpec(name, W, 1.0).shape for name in VARIANTS}
    assert {n: (s.lookback, s.slots, s.leaving_per_step) for n, s in shapes.items()} == {
        "sliding_window": (W - 1, W, 1), "terraced": (2 * W - 1, 2 * W, W), "linear": (0, 0, 1)}
    # chunks aligned with terraced blocks look back less than the general 2w - 1
    assert shapes["terraced"].aligned_lookback(8) == 2 * W - 8 and shapes["sliding_window"].aligned_lookback(8) == W - 1


@pytest.mark.parametrize("kwargs,message", [
    ({"variant": "sliding"}, "unknown attention variant 'sliding'; choose one of sliding_window, terraced, linear"),
    ({"window_size": 0}, "AttentionSpec.window_size=0 must be a positive integer"),
    ({"chunk_size": 2.5}, "AttentionSpec.chunk_size=2.5 must be a positive integer"),
    ({"scale": float("nan")}, "AttentionSpec.scale=nan must be a finite number"),
])
def test_attention_spec_names_a_bad_value(kwargs, message):
    with pytest.raises(ValueError, match=message):
        AttentionSpec(**{"variant": "terraced", "window_size": W, "scale": 1.0, "chunk_size": 8, **kwargs})


# ----------------------------------------------------------------------------------------- decode

DECODE_T = 300


def decode_all(q, k, v, fmap_q, fmap_k, gamma, valid, variant, window, state=None, start=0):
    fq = fmap_q(q)
    if state is None:
        state = empty_state(B, H, HKV, D, D, fmap_k.out_dim, spec(variant, window), dtype=q.dtype, device=q.device)
    ys = []
    for i in range(start, q.shape[2]):
        y, state = decode_step(state, q[:, :, i : i + 1], k[:, :, i : i + 1], v[:, :, i : i + 1],
                               fq[:, :, i : i + 1], gamma, fmap_k, spec(variant, window), valid[:, i])
        ys.append(y)
    return torch.cat(ys, dim=2), state


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("pad", [0, 11], ids=["nopad", "leftpad11"])
def test_token_by_token_decode_matches_parallel(variant, pad):
    """Steps 1..300 with w = 64: each step's output equals the parallel forward's (fp32, atol 1e-5)."""
    q, k, v, fmap_q, fmap_k, gamma, valid = make_inputs(DECODE_T, seed=1, pad=pad)
    with torch.no_grad():
        parallel = run(hybrid_attention_chunked, q, k, v, fmap_q, fmap_k, gamma, valid, variant, window=64)
        steps, state = decode_all(q, k, v, fmap_q, fmap_k, gamma, valid, variant, 64)
    torch.testing.assert_close(steps, parallel, atol=1e-5, rtol=1e-5)
    assert state.num_tokens == DECODE_T
    # the window holds at most L keys, however long the sequence
    assert state.window_k.shape[2] == {"sliding_window": 64, "terraced": 128, "linear": 0}[variant]


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("prompt", [1, 40, 64, 129, 200])
def test_prefill_then_decode_matches_parallel(variant, prompt):
    """A state built from a parallel prompt pass continues exactly like the full parallel pass."""
    q, k, v, fmap_q, fmap_k, gamma, valid = make_inputs(260, seed=2, pad=5)
    with torch.no_grad():
        parallel = run(hybrid_attention_chunked, q, k, v, fmap_q, fmap_k, gamma, valid, variant, window=64)
        fk = fmap_k(repeat_kv(k[:, :, :prompt], H // HKV))
        state = prefill_state(k[:, :, :prompt], v[:, :, :prompt], fk, spec(variant, 64), valid[:, :prompt])
        steps, _ = decode_all(q, k, v, fmap_q, fmap_k, gamma, valid, variant, 64, state=state, start=prompt)
    torch.testing.assert_close(steps, parallel[:, :, prompt:], atol=1e-5, rtol=1e-5)


def test_decode_state_size_is_constant():
    q, k, v, fmap_q, fmap_k, gamma, valid = make_inputs(260, seed=3)
    sizes = []
    with torch.no_grad():
        for t in (130, 260):
            _, state = decode_all(q[:, :, :t], k[:, :, :t], v[:, :, :t], fmap_q, fmap_k, gamma, valid, "terraced", 64)
            sizes.append([tuple(x.shape) for x in state.tensors()])
    assert sizes[0] == sizes[1]


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("pad", [0, 30], ids=["nopad", "leftpad30"])
@pytest.mark.parametrize("pieces", [(40, 1, 100, 119), (64, 64, 132), (129, 3, 128), (1, 259)],
                         ids=lambda p: "-".join(map(str, p)))
def test_extend_state_matches_parallel_and_decode(variant, pad, pieces):
    """Several tokens at once on top of a state (a cached prefix) equal the parallel pass and leave
    the same state as stepping token by token: w = 64, pieces of 1..259 tokens, left padding that
    ends inside a later piece (pad 30 > first piece 1)."""
    q, k, v, fmap_q, fmap_k, gamma, valid = make_inputs(sum(pieces), seed=4, pad=pad)
    with torch.no_grad():
        parallel = run(hybrid_attention_chunked, q, k, v, fmap_q, fmap_k, gamma, valid, variant, window=64)
        _, stepped = decode_all(q, k, v, fmap_q, fmap_k, gamma, valid, variant, 64)
        state = empty_state(B, H, HKV, D, D, fmap_k.out_dim, spec(variant, 64), dtype=q.dtype, device=q.device)
        ys, start = [], 0
        for n in pieces:
            sl = slice(start, start + n)
            y, state = extend_state(state, q[:, :, sl], k[:, :, sl], v[:, :, sl], fmap_q(q[:, :, sl]), gamma, fmap_k,
                                    spec(variant, 64, chunk_size=32), valid[:, sl])
            ys.append(y)
            start += n
    torch.testing.assert_close(torch.cat(ys, dim=2), parallel, atol=1e-5, rtol=1e-5)
    assert state.num_tokens == stepped.num_tokens
    for got, want in zip(state.tensors(), stepped.tensors(), strict=True):
        assert got.shape == want.shape and got.dtype == want.dtype
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("prefix,t", [(1, 5), (40, 1), (70, 30), (129, 64), (200, 150)])
def test_attend_on_state_matches_parallel(variant, prefix, t):
    """Continuations read against a state that is not advanced — the state's own rows (row 1 left-padded) and
    one shared batch-1 state read by every row — equal the parallel pass over prefix + continuation
    (w = 64, fp32, atol 1e-5); the state is left as it was; gradients equal the chunked attend_after's."""
    q, k, v, fmap_q, fmap_k, gamma, valid = make_inputs(prefix + t, seed=5, pad=min(prefix - 1, 9))
    sp = spec(variant, 64)
    pre, new = slice(0, prefix), slice(prefix, prefix + t)
    with torch.no_grad():
        parallel = run(hybrid_attention_chunked, q, k, v, fmap_q, fmap_k, gamma, valid, variant, window=64)
        fk = fmap_k(repeat_kv(k[:, :, pre], H // HKV))
        state = prefill_state(k[:, :, pre], v[:, :, pre], fk, sp, valid[:, pre])
        before = [x.clone() for x in state.tensors()]
        y = attend_on_state(state, q[:, :, new], k[:, :, new], v[:, :, new], fmap_q(q[:, :, new]), gamma, fmap_k, sp)
        torch.testing.assert_close(y, parallel[:, :, new], atol=1e-5, rtol=1e-5)
        chunked = attend_after(state, q[:, :, new], k[:, :, new], v[:, :, new], fmap_q(q[:, :, new]), gamma, fmap_k, sp)
        torch.testing.assert_close(chunked, parallel[:, :, new], atol=1e-5, rtol=1e-5)
        for got, want in zip(state.tensors(), before, strict=True):
            assert torch.equal(got, want)
        # One prefix (row 0's), three different continuations: each as if run alone after it.
        shared = prefill_state(k[:1, :, pre], v[:1, :, pre], fk[:1], sp)
        rows = [torch.cat([x[:1, :, pre], x[r : r + 1, :, new]], dim=2) for x in (q, k, v) for r in (0, 1, 0)]
        qs, ks, vs = (torch.cat(rows[i : i + 3]) for i in (0, 3, 6))
        qs[2, :, prefix:] *= 0.5  # a third continuation unlike the first
        want, _ = hybrid_attention_chunked(qs, ks, vs, fmap_q(qs), fmap_k(repeat_kv(ks, H // HKV)), gamma, sp)
        got = attend_on_state(shared, qs[:, :, new], ks[:, :, new], vs[:, :, new], fmap_q(qs[:, :, new]), gamma,
                              fmap_k, sp)
        torch.testing.assert_close(got, want[:, :, new], atol=1e-5, rtol=1e-5)
    # Gradients (q, k, v, γ and both feature maps) equal the chunked form's.
    grads = []
    for dense in (True, False):
        leaves = [x[:, :, new].clone().requires_grad_() for x in (q, k, v)] + [gamma.clone().requires_grad_()]
        for p in (*fmap_q.parameters(), *fmap_k.parameters()):
            p.grad = None
        args = (state, *leaves[:3], fmap_q(leaves[0]), leaves[3], fmap_k)
        out = (attend_on_state if dense else attend_after)(*args, sp)
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        grads.append([x.grad for x in leaves] + [p.grad for p in (*fmap_q.parameters(), *fmap_k.parameters())])
    for a, b in zip(*grads, strict=True):  # None: no path to that leaf (no linear pair reads φ_k), a zero gradient
        torch.testing.assert_close(torch.zeros_like(b) if a is None else a, b, atol=1e-5, rtol=1e-4)
