"""Tiny random models of every supported family, built locally (no hub), CPU, float32, seeded."""

from __future__ import annotations

import pytest
import torch
import transformers

COMMON = dict(
    vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=False,
)


def _llama():
    return transformers.LlamaConfig(**COMMON, rope_theta=10000.0)


def _mistral():
    return transformers.MistralConfig(**COMMON, sliding_window=None)


def _mixtral():
    return transformers.MixtralConfig(**COMMON, num_local_experts=4, num_experts_per_tok=2, sliding_window=None)


def _qwen2():
    return transformers.Qwen2Config(**COMMON)


def _qwen3():
    return transformers.Qwen3Config(**COMMON, head_dim=16)


def _gemma3():
    # head_dim != hidden / heads, own query_pre_attn_scalar, alternating local/global layers
    return transformers.Gemma3TextConfig(
        **{**COMMON, "num_hidden_layers": 3}, head_dim=24, query_pre_attn_scalar=20,
        sliding_window=512, layer_types=["sliding_attention", "sliding_attention", "full_attention"],
    )


def _phi3():
    return transformers.Phi3Config(**COMMON, pad_token_id=0, bos_token_id=1, eos_token_id=2, sliding_window=None)


FAMILY_CONFIGS = {
    "llama": (_llama, transformers.LlamaForCausalLM),
    "mistral": (_mistral, transformers.MistralForCausalLM),
    "mixtral": (_mixtral, transformers.MixtralForCausalLM),
    "qwen2": (_qwen2, transformers.Qwen2ForCausalLM),
    "qwen3": (_qwen3, transformers.Qwen3ForCausalLM),
    "gemma3": (_gemma3, transformers.Gemma3ForCausalLM),
    "phi3": (_phi3, transformers.Phi3ForCausalLM),
}


def build_tiny(family: str, seed: int = 0, **overrides) -> transformers.PreTrainedModel:
    """A tiny random model of ``family`` in eval mode; biases and norms randomised so mistakes show."""
    make_config, cls = FAMILY_CONFIGS[family]
    config = make_config()
    for key, value in overrides.items():
        setattr(config, key, value)
    config._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    model = cls(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(0.2 * torch.randn_like(p))
    return model


@pytest.fixture(params=sorted(FAMILY_CONFIGS))
def family(request) -> str:
    return request.param


@pytest.fixture
def tiny_llama() -> transformers.PreTrainedModel:
    return build_tiny("llama")
