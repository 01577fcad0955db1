"""Model surgery on tiny random models of every supported family."""

from __future__ import annotations

import pytest
import torch
import transformers
from conftest import build_tiny

import lolcats
from lolcats import AttentionConfig, convert_model
from lolcats.attention import LolcatsAttention

T = 48


def ids(batch: int = 2, t: int = T, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 128, (batch, t), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("variant", ["sliding_window", "terraced"])
@pytest.mark.parametrize("use_cache", [False, True], ids=["nocache", "cache"])
def test_full_window_conversion_reproduces_logits(family, variant, use_cache):
    """Window >= sequence: no linear term remains, so logits equal the original's (atol 1e-5).

    Catches mistakes in scaling, q/k norms, biases, fused qkv and rotary.
    """
    model = build_tiny(family)
    x = ids()
    with torch.no_grad():
        expected = model(x, use_cache=False).logits
    convert_model(model, AttentionConfig(variant=variant, window_size=T))
    assert len(lolcats.linearized_layers(model)) == model.config.num_hidden_layers
    with torch.no_grad():
        got = model(x, use_cache=use_cache).logits
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_forward_backward_through_converted_model(family):
    model = build_tiny(family)
    convert_model(model, AttentionConfig(window_size=8, feature_dim=8))
    model.train()
    x = ids(t=40)
    loss = model(x, labels=x, use_cache=False).loss
    loss.backward()
    trainable = lolcats.trainable_attention_parameters(model)
    assert trainable
    for name, p in trainable.items():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, f"no gradient reached {name}"
    for name, p in model.named_parameters():
        if name not in trainable:
            assert p.grad is None, f"frozen parameter {name} received a gradient"


def test_only_feature_maps_and_window_factors_train(tiny_llama):
    convert_model(tiny_llama, AttentionConfig(feature_dim=64))
    trainable = {n for n, p in tiny_llama.named_parameters() if p.requires_grad}
    assert trainable == set(lolcats.trainable_attention_parameters(tiny_llama))
    # per layer: φ_q and φ_k are (H, D, f) = 4 * 16 * 64 each, plus one ω per head
    count = sum(p.numel() for p in tiny_llama.parameters() if p.requires_grad)
    assert count == 2 * (2 * 4 * 16 * 64 + 4) == 16_392


def test_smollm2_trainable_count_in_readme():
    """The README's SmolLM2-135M figure for the demo recipe's attention, computed from the architecture (no
    weights needed): the maps, one ω and one decay ρ per head."""
    from lolcats.config import load_config

    config = transformers.LlamaConfig(
        vocab_size=512, hidden_size=576, intermediate_size=64, num_hidden_layers=30, num_attention_heads=9,
        num_key_value_heads=3, tie_word_embeddings=True)
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(config)
    convert_model(model, load_config(str(__import__("pathlib").Path(__file__).parents[1] / "recipes/smollm2_135m.yaml"))
                  .attention)
    count = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert count == 2_211_840 + 270 + 270
    readme = (__import__("pathlib").Path(__file__).parents[1] / "README.md").read_text()
    assert f"{count:,}" in readme


def test_attention_module_keeps_original_weights_and_names(family):
    model = build_tiny(family)
    before = {n: p.clone() for n, p in model.named_parameters()}
    convert_model(model)
    after = dict(model.named_parameters())
    for name, p in before.items():
        assert name in after, f"{name} disappeared"
        assert torch.equal(after[name], p)
    new = set(after) - set(before)
    assert new and all(any(k in n for k in ("feature_map_q", "feature_map_k", "window_factor")) for n in new)


def test_skip_layers_stay_softmax(tiny_llama):
    convert_model(tiny_llama, AttentionConfig(skip_layers=[1]))
    layers = lolcats.find_decoder_layers(tiny_llama)
    assert isinstance(layers[0].self_attn, LolcatsAttention)
    assert type(layers[1].self_attn).__name__ == "LlamaAttention"
    x = ids()
    with torch.no_grad():
        assert torch.isfinite(tiny_llama(x).logits).all()


def test_keep_native_window_leaves_local_layers_alone():
    """Gemma 3 local layers (native window 6 < T) stay as they are; the global layer is converted."""
    model = build_tiny("gemma3", sliding_window=6)
    x = ids()
    with torch.no_grad():
        expected = model(x, use_cache=False).logits
    convert_model(model, AttentionConfig(window_size=T, keep_native_window=True))
    kinds = [type(layer.self_attn).__name__ for layer in lolcats.find_decoder_layers(model)]
    assert kinds == ["Gemma3Attention", "Gemma3Attention", "LolcatsAttention"]
    with torch.no_grad():
        torch.testing.assert_close(model(x, use_cache=False).logits, expected, atol=1e-5, rtol=1e-5)


def test_left_padded_batch_row_equals_sequence_alone(tiny_llama):
    convert_model(tiny_llama, AttentionConfig(window_size=8, variant="terraced", feature_dim=8))
    x = ids(batch=1, t=40)
    pad = 5
    padded = torch.cat([torch.zeros(1, pad, dtype=torch.long), x], dim=1)
    mask = torch.ones_like(padded)
    mask[:, :pad] = 0
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        alone = tiny_llama(x, use_cache=False).logits
        both = tiny_llama(padded, attention_mask=mask, position_ids=position_ids, use_cache=False).logits
    torch.testing.assert_close(both[:, pad:], alone, atol=1e-5, rtol=1e-5)


def test_unsupported_architecture_is_refused_untouched():
    config = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=64)
    model = transformers.GPT2LMHeadModel(config)
    with pytest.raises(ValueError, match=r"GPT2LMHeadModel.*gpt2.*supported model types: .*llama"):
        convert_model(model)
    assert all(p.requires_grad for p in model.parameters())


def test_bad_skip_layer_leaves_model_unchanged(tiny_llama):
    with pytest.raises(ValueError, match="skip_layers has index 5 but the model has 2 layers"):
        convert_model(tiny_llama, AttentionConfig(skip_layers=[5]))
    assert not lolcats.linearized_layers(tiny_llama)
    assert all(p.requires_grad for p in tiny_llama.parameters())


def test_converting_twice_is_refused(tiny_llama):
    convert_model(tiny_llama)
    with pytest.raises(ValueError, match="already linearized"):
        convert_model(tiny_llama)


def test_generate_with_state_matches_full_forward(tiny_llama):
    """Greedy generation through the decode state equals re-running the full sequence each step."""
    convert_model(tiny_llama, AttentionConfig(window_size=4, variant="terraced", feature_dim=8))
    x = ids(batch=1, t=10)
    with torch.no_grad():
        out = tiny_llama.generate(x, max_new_tokens=20, do_sample=False, pad_token_id=0)
        logits = tiny_llama(out, use_cache=False).logits
    assert out.shape[1] == 30
    assert torch.equal(out[0, 10:], logits[0, 9:-1].argmax(-1))
