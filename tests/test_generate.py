"""Generation through the constant-size decode state equals full forward passes."""

from __future__ import annotations

import pytest
import torch
from conftest import build_tiny

from lolcats import AttentionConfig, convert_model
from lolcats.attention import LolcatsCache, LolcatsCacheLayer, cache_nbytes
from lolcats.ops import VARIANTS


def tiny(variant: str, **kw):
    model = build_tiny("llama", **kw)
    convert_model(model, AttentionConfig(variant=variant, window_size=8, feature_dim=8))
    return model


def generate_with_logits(model, ids, steps, **kw):
    out = model.generate(ids, max_new_tokens=steps, min_new_tokens=steps, do_sample=False, pad_token_id=0,
                         return_dict_in_generate=True, output_logits=True, **kw)
    return out.sequences, torch.stack(out.logits, dim=1)  # (B, steps, V)


@pytest.mark.parametrize("variant", VARIANTS)
def test_generated_step_logits_equal_full_forward(variant):
    """64 steps (8× the window): every step's logits equal a full forward pass's (atol 1e-4)."""
    model = tiny(variant)
    ids = torch.randint(0, 128, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        seq, step_logits = generate_with_logits(model, ids, 64)
        full = model(seq, use_cache=False).logits
    torch.testing.assert_close(step_logits, full[:, 11:-1], atol=1e-4, rtol=1e-4)


def left_padded(prompts):
    """(ids, attention mask) of 1-D prompts left-padded with 0 to the longest."""
    width = max(len(p) for p in prompts)
    ids = torch.stack([torch.cat([torch.zeros(width - len(p), dtype=torch.long), p]) for p in prompts])
    mask = torch.stack([torch.cat([torch.zeros(width - len(p)), torch.ones(len(p))]) for p in prompts]).long()
    return ids, mask


@pytest.mark.parametrize("variant", VARIANTS)
def test_left_padded_batch_generation(variant):
    """Rows of different prompt lengths, left-padded: each row's step logits equal the row run alone."""
    model = tiny(variant)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(1, 128, (n,), generator=g) for n in (5, 13)]
    ids, mask = left_padded(prompts)
    width = ids.shape[1]
    with torch.no_grad():
        seq, step_logits = generate_with_logits(model, ids, 30, attention_mask=mask)
        for row, p in enumerate(prompts):
            alone = torch.cat([p, seq[row, width:]])[None]
            full = model(alone, use_cache=False).logits
            torch.testing.assert_close(step_logits[row], full[0, len(p) - 1 : -1], atol=1e-4, rtol=1e-4)


def test_hybrid_model_with_softmax_layer_generates_exactly():
    model = build_tiny("llama")
    convert_model(model, AttentionConfig(window_size=8, feature_dim=8, skip_layers=[0]))
    ids = torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(2))
    cache = LolcatsCache(model)
    assert [type(layer).__name__ for layer in cache.layers] == ["DynamicLayer", "LolcatsCacheLayer"]
    with torch.no_grad():
        seq, step_logits = generate_with_logits(model, ids, 20, past_key_values=cache)
        full = model(seq, use_cache=False).logits
    torch.testing.assert_close(step_logits, full[:, 9:-1], atol=1e-4, rtol=1e-4)


def state_bytes_after(model, tokens: int, cache) -> int:
    ids = torch.randint(0, 128, (1, tokens), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        model(ids[:, : tokens - 2], past_key_values=cache, use_cache=True)
        for t in range(tokens - 2, tokens):  # two decode steps as well
            model(ids[:, t : t + 1], past_key_values=cache, use_cache=True)
    return cache_nbytes(cache)


@pytest.mark.parametrize("variant", VARIANTS)
def test_cache_bytes_do_not_grow_with_context(variant):
    model = tiny(variant, max_position_embeddings=4096)
    sizes = [state_bytes_after(model, n, LolcatsCache(model)) for n in (128, 2048)]
    assert sizes[0] == sizes[1] > 0
    # and a plain DynamicCache passed to the model gets the same constant-size layers
    from transformers import DynamicCache

    dyn = DynamicCache()
    state_bytes_after(model, 128, dyn)
    assert all(isinstance(layer, LolcatsCacheLayer) for layer in dyn.layers)


def test_sampling_and_multiple_sequences():
    model = tiny("terraced")
    ids = torch.randint(0, 128, (1, 6), generator=torch.Generator().manual_seed(4))
    torch.manual_seed(0)
    with torch.no_grad():
        a = model.generate(ids, max_new_tokens=10, do_sample=True, num_return_sequences=3, pad_token_id=0)
    torch.manual_seed(0)
    with torch.no_grad():
        b = model.generate(ids, max_new_tokens=10, do_sample=True, num_return_sequences=3, pad_token_id=0)
    assert a.shape == (3, 16) and torch.equal(a, b)
    assert torch.equal(a[:, :6], ids.expand(3, -1))


def test_cache_cannot_be_cropped():
    model = tiny("sliding_window")
    cache = LolcatsCache(model)
    state_bytes_after(model, 20, cache)
    with pytest.raises(NotImplementedError, match="cannot drop tokens"):
        cache.crop(-3)
