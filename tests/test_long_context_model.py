"""Sink tokens and decay through the whole model: generation equals full forward passes (also left-padded),
the cache stays constant, a covering window is still the original, and a run trains, saves, loads and
exports the decay."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import build_tiny, tiny_recipe, write_recipe
from safetensors import safe_open

import lolcats
from lolcats import AttentionConfig, convert_model
from lolcats.attention import LolcatsCache, cache_nbytes
from lolcats.cli import main

OPTIONS = {"sinks": {"sink_tokens": 3}, "decay": {"decay": True, "decay_init": 0.9},
           "sinks+decay": {"sink_tokens": 3, "decay": True, "decay_init": 0.9}}


def tiny(variant: str, options: dict, **kw):
    model = build_tiny("llama", **kw)
    convert_model(model, AttentionConfig(variant=variant, window_size=8, feature_dim=8, **options))
    with torch.no_grad():  # heads with different decays, as after training
        for layer in lolcats.linearized_layers(model):
            if layer.decay_logit is not None:
                layer.decay_logit.add_(torch.linspace(-1, 2, layer.num_heads))
    return model


def generate_with_logits(model, ids, steps, **kw):
    out = model.generate(ids, max_new_tokens=steps, min_new_tokens=steps, do_sample=False, pad_token_id=0,
                         return_dict_in_generate=True, output_logits=True, **kw)
    return out.sequences, torch.stack(out.logits, dim=1)


@pytest.mark.parametrize("name", OPTIONS)
@pytest.mark.parametrize("variant", ["sliding_window", "terraced", "linear"])
def test_generation_equals_full_forward(name, variant):
    """48 steps after a 12-token prompt, and a left-padded batch whose rows start 8 tokens apart: every
    step's logits equal a full forward pass over that row alone (atol 1e-4)."""
    model = tiny(variant, OPTIONS[name])
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(1, 128, (n,), generator=g) for n in (2, 12)]  # row 0 shorter than the sinks
    width = max(len(p) for p in prompts)
    ids = torch.stack([torch.cat([torch.zeros(width - len(p), dtype=torch.long), p]) for p in prompts])
    mask = torch.stack([torch.cat([torch.zeros(width - len(p)), torch.ones(len(p))]) for p in prompts]).long()
    with torch.no_grad():
        seq, step_logits = generate_with_logits(model, ids, 48, attention_mask=mask)
        for row, p in enumerate(prompts):
            alone = torch.cat([p, seq[row, width:]])[None]
            full = model(alone, use_cache=False).logits
            torch.testing.assert_close(step_logits[row], full[0, len(p) - 1 : -1], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", OPTIONS)
def test_cache_bytes_are_constant_and_count_the_sinks(name):
    model = tiny("terraced", OPTIONS[name], max_position_embeddings=4096)
    plain = tiny("terraced", {}, max_position_embeddings=4096)
    sizes = []
    for m in (model, plain):
        for n in (128, 1024):
            cache = LolcatsCache(m)
            ids = torch.randint(0, 128, (1, n), generator=torch.Generator().manual_seed(3))
            with torch.no_grad():
                m(ids[:, :-1], past_key_values=cache, use_cache=True)
                m(ids[:, -1:], past_key_values=cache, use_cache=True)
            sizes.append(cache_nbytes(cache))
    assert sizes[0] == sizes[1] and sizes[2] == sizes[3]
    cfg = model.config
    sink_bytes = 2 * OPTIONS[name].get("sink_tokens", 0) * cfg.num_key_value_heads * (cfg.hidden_size
                                                                                    // cfg.num_attention_heads) * 4
    assert sizes[0] - sizes[2] >= sink_bytes * cfg.num_hidden_layers


@pytest.mark.parametrize("name", OPTIONS)
def test_covering_window_is_the_original(name):
    model = build_tiny("llama")
    x = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = model(x, use_cache=False).logits
    convert_model(model, AttentionConfig(variant="sliding_window", window_size=24, **OPTIONS[name]))
    with torch.no_grad():
        torch.testing.assert_close(model(x, use_cache=False).logits, want, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(model(x, use_cache=True).logits, want, atol=1e-5, rtol=1e-5)


def test_run_trains_saves_loads_and_exports_the_decay(tiny_run, tmp_path):
    """Stage 1 trains λ with the feature maps; the out_dir keeps it (a trainable key), ``load`` and the
    export give the run's own logits, and the report's config names the options."""
    _, root = tiny_run
    recipe = tiny_recipe(root, **{"attention.sink_tokens": 2, "attention.decay": True, "attention.decay_init": 0.9,
                                  "distill.lr": 0.05})
    path = write_recipe(root / "options.yaml", recipe)
    assert main(["linearize", str(path)]) == 0
    out = root / "out"
    with safe_open(str(out / "attention.safetensors"), "pt") as f:
        decays = {k: f.get_tensor(k) for k in f.keys() if k.endswith("decay_logit")}  # noqa: SIM118
    assert len(decays) == 2  # one per layer
    init = torch.logit(torch.tensor(0.9))
    assert all(not torch.allclose(v, init.expand_as(v)) for v in decays.values())  # trained
    record = json.loads((out / "lolcats_config.json").read_text())
    assert record["config"]["attention"]["sink_tokens"] == 2 and record["config"]["attention"]["decay"] is True
    model = lolcats.load(out)
    layer = lolcats.linearized_layers(model)[0]
    assert layer.spec.sinks == 2
    torch.testing.assert_close(layer.decay_logit.detach(), decays["layers.0.decay_logit"])
    x = torch.randint(3, 40, (1, 40))
    assert main(["export", str(out), "--merge", "--to", str(tmp_path / "merged")]) == 0
    with torch.no_grad():
        torch.testing.assert_close(lolcats.load(tmp_path / "merged")(input_ids=x).logits, model(input_ids=x).logits,
                                   atol=1e-5, rtol=1e-5)
