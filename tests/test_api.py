"""The public Python API."""

from __future__ import annotations

import torch

import lolcats


def test_public_names():
    for name in ("convert_model", "linearize", "load", "AttentionConfig", "LolcatsConfig", "load_config",
                 "supported_model_types"):
        assert hasattr(lolcats, name), name
    assert set(lolcats.supported_model_types()) == {"gemma3_text", "llama", "mistral", "mixtral", "phi3", "phimoe",
                                                    "qwen2", "qwen3"}


def test_api_round_trip(tiny_run):
    """linearize -> load through the top-level API gives the same logits."""
    recipe, root = tiny_run
    cfg = lolcats.load_config(str(recipe), ["lora.max_steps=0", "report.enabled=false"])
    result = lolcats.linearize(cfg)
    model = lolcats.load(root / "out")
    x = torch.randint(3, 40, (1, 30))
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, result.model(x).logits, atol=0, rtol=0)
    assert not (root / "out" / "adapter").exists(), "no stage 2, no adapter"
