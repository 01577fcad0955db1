"""Softmax layers chosen after stage 1 (``attention.softmax_layers``): restoring a layer, both criteria, and the
pipeline step (ranking file, derived config, load, report, resume, ``skip_layers`` by hand)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import build_tiny, make_corpus, make_tiny_model_folder, write_recipe
from test_blockwise import recipe as blockwise_recipe

from lolcats.attention import LolcatsAttention, find_decoder_layers
from lolcats.checkpoint import CheckpointError, load
from lolcats.config import AttentionConfig, load_config
from lolcats.convert import convert_model
from lolcats.data import Chunks
from lolcats.distill import heldout_attention_mse
from lolcats.layer_choice import kl_sweep, kl_to_original, rank_layers, restore_softmax, softmax_module
from lolcats.pipeline import linearize

ATTN = AttentionConfig(window_size=8, feature_dim=8, chunk_size=8)


def chunks(n: int = 2, t: int = 40, seed: int = 0) -> Chunks:
    ids = torch.randint(3, 40, (n, t), generator=torch.Generator().manual_seed(seed))  # in every tiny vocabulary
    return Chunks(ids, ids.clone())


def converted(family: str = "llama", **overrides) -> torch.nn.Module:
    model = build_tiny(family, **overrides)
    convert_model(model, ATTN, seed=0)
    return model


def test_restoring_every_layer_gives_the_original_model(family):
    """KL(original ‖ model) is clearly > 0 for the linearized model, ≈ 0 with every layer restored: the rebuilt
    module is the family's own softmax attention over the same projections (norms, fused qkv, native windows)."""
    model = converted(family)
    data = chunks()
    everything = list(range(len(find_decoder_layers(model))))
    kl = kl_sweep(model, data, {"none": [], "all": everything, **{i: [i] for i in everything}})
    assert kl["none"] > 1e-6, kl
    assert abs(kl["all"]) <= 1e-4 * kl["none"], kl
    for i in everything:  # one layer restored: a finite KL ≥ 0, and a drop ≥ 0 (up to a little)
        assert math.isfinite(kl[i]) and kl[i] > -1e-9 and kl["none"] - kl[i] > -0.05 * kl["none"], (i, kl)
    assert all(isinstance(layer.self_attn, LolcatsAttention) for layer in find_decoder_layers(model))  # put back


def test_restored_layer_is_the_skip_layers_module_and_decodes():
    """A layer restored after conversion is the module ``skip_layers`` keeps: same class, same logits as a model
    converted with that layer skipped; ``generate`` with a cache matches the parallel forward."""
    model = converted()
    restore_softmax(model, [0])
    skipped = build_tiny("llama")
    convert_model(skipped, AttentionConfig(window_size=8, feature_dim=8, chunk_size=8, skip_layers=[0]), seed=0)
    a, b = find_decoder_layers(model), find_decoder_layers(skipped)
    assert type(a[0].self_attn) is type(b[0].self_attn) and not isinstance(a[0].self_attn, LolcatsAttention)
    assert isinstance(a[1].self_attn, LolcatsAttention)
    assert a[0].self_attn.q_proj is not None and not any(p.is_meta for p in model.parameters())
    b[1].self_attn.load_state_dict(a[1].self_attn.state_dict())
    ids = chunks(1, 30).input_ids
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, skipped(ids).logits, atol=0, rtol=0)
        out = model.generate(ids[:, :12], max_new_tokens=10, do_sample=False, output_scores=True,
                             return_dict_in_generate=True, pad_token_id=0)
        full = model(out.sequences, use_cache=False).logits
    torch.testing.assert_close(torch.stack(out.scores, 1), full[:, 11:-1], atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="layer 0 is not linearized"):
        softmax_module(model, 0)


def test_rank_layers_records_both_criteria():
    model = build_tiny("llama", num_hidden_layers=3)
    convert_model(model, ATTN, seed=0)
    data = chunks()
    record = rank_layers(model, data, 2, "output_error")
    assert sorted(record["ranking"]["kl_drop"]) == sorted(record["ranking"]["output_error"]) == [0, 1, 2]
    assert record["chosen"] == sorted(record["ranking"]["output_error"][:2])
    assert [row["layer"] for row in record["layers"]] == [0, 1, 2]
    drops = {row["layer"]: row["kl_drop"] for row in record["layers"]}
    assert record["ranking"]["kl_drop"] == sorted(drops, key=lambda i: -drops[i])
    # output error's attention MSE is stage 1's per-layer held-out MSE on the same chunks
    torch.testing.assert_close(torch.tensor([row["attention_mse"] for row in record["layers"]]),
                               torch.tensor(heldout_attention_mse(model, data)), rtol=1e-5, atol=0)
    assert all(row["output_error"] > 0 and math.isfinite(row["output_error"]) for row in record["layers"])
    errors = {row["layer"]: row["output_error"] for row in record["layers"]}
    assert record["ranking"]["output_error"] == sorted(errors, key=lambda i: -errors[i])
    top = record["kl_top_restored"]
    assert top["output_error"] == pytest.approx(kl_to_original(model, data, record["chosen"]), rel=1e-9)
    assert top["kl_drop"] == pytest.approx(kl_to_original(model, data, record["ranking"]["kl_drop"][:2]), rel=1e-9)
    assert top["kl_drop"] < record["kl_linearized"]
    with pytest.raises(ValueError, match=r"attention.softmax_layers=3 would keep all 3 linearized layers"):
        rank_layers(model, data, 3, "kl_drop")


def test_config_checks():
    with pytest.raises(ValueError, match="attention.softmax_criterion='mse' is not valid; choose one of 'kl_drop'"):
        AttentionConfig(softmax_layers=1, softmax_criterion="mse")
    with pytest.raises(ValueError, match="skip_layers_chosen=true with skip_layers=\\[1, 2\\] and softmax_layers=1"):
        AttentionConfig(softmax_layers=1, skip_layers=[1, 2], skip_layers_chosen=True)
    chosen = AttentionConfig(softmax_layers=1).with_chosen([3])
    assert (chosen.skip_layers, chosen.skip_layers_chosen) == ([3], True)
    assert chosen.recipe() == AttentionConfig(softmax_layers=1)
    assert AttentionConfig(skip_layers=[3]).recipe().skip_layers == [3]  # by hand: kept


# ------------------------------------------------------------------------------------ the pipeline step
def _run(tiny_run, *overrides):
    recipe, root = tiny_run
    return linearize(load_config(str(recipe), list(overrides))), root / "out"


def test_linearize_chooses_records_loads_and_resumes(tiny_run):
    result, out = _run(tiny_run, "attention.softmax_layers=1")
    choice = json.loads((out / "layer_choice.json").read_text())
    assert len(choice["layers"]) == 2 and {"kl_drop", "output_error", "attention_mse"} <= set(choice["layers"][0])
    assert choice["criterion"] == "kl_drop" and choice["chosen"] == choice["ranking"]["kl_drop"][:1]
    (chosen,) = choice["chosen"]
    record = json.loads((out / "lolcats_config.json").read_text())
    attention = record["config"]["attention"]
    assert (attention["skip_layers"], attention["skip_layers_chosen"], attention["softmax_layers"]) == ([chosen], True, 1)
    assert "layer_choice.json" in record["files"] and record["status"] == "complete"
    report = (out / "report.md").read_text()
    assert "## Softmax layers (attention.softmax_layers = 1)" in report and "after stage 1, chosen layers back" in report
    assert report.count("| yes |") == 1
    # the out_dir loads with the chosen layer as softmax, to the same logits
    model = load(out)
    layers = find_decoder_layers(model)
    assert not isinstance(layers[chosen].self_attn, LolcatsAttention)
    assert isinstance(layers[1 - chosen].self_attn, LolcatsAttention)
    ids = chunks(1, 30).input_ids
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, result.model(ids).logits, atol=0, rtol=0)
    # the same recipe again resumes: nothing measured or trained again
    metrics = (out / "metrics.jsonl").read_text()
    again, _ = _run(tiny_run, "attention.softmax_layers=1")
    assert json.loads((out / "layer_choice.json").read_text()) == choice
    assert (out / "metrics.jsonl").read_text().count('"stage": "stage') == metrics.count('"stage": "stage')
    with torch.no_grad():
        torch.testing.assert_close(again.model(ids).logits, result.model(ids).logits, atol=0, rtol=0)
    with pytest.raises(CheckpointError, match=r"another config \(differs in attention.softmax_layers\)"):
        _run(tiny_run, "attention.softmax_layers=0")
    # stage 1 does not depend on softmax_layers: one stage-1 result serves both
    _, plain_out = _run(tiny_run, "out_dir=" + str(out.parent / "plain"), "lora.max_steps=0", "report.enabled=false")
    from safetensors.torch import load_file

    a, b = load_file(str(out / "attention.safetensors")), load_file(str(plain_out / "attention.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_run_stopped_after_the_choice_resumes(tiny_run):
    from lolcats.io import set_fault_hook

    def stop(key: str) -> bool:
        if key == "write:layer_choice.json:after-rename":
            raise KeyboardInterrupt
        return False

    set_fault_hook(stop)
    try:
        with pytest.raises(KeyboardInterrupt):
            _run(tiny_run, "attention.softmax_layers=1")
    finally:
        set_fault_hook(None)
    _, out = _run(tiny_run, "attention.softmax_layers=1")
    record = json.loads((out / "lolcats_config.json").read_text())
    choice = json.loads((out / "layer_choice.json").read_text())
    assert record["status"] == "complete" and record["config"]["attention"]["skip_layers"] == choice["chosen"]


def test_skip_layers_by_hand_win(tiny_run):
    _, out = _run(tiny_run, "attention.softmax_layers=1", "attention.skip_layers=[0]")
    assert not (out / "layer_choice.json").exists()
    attention = json.loads((out / "lolcats_config.json").read_text())["config"]["attention"]
    assert (attention["skip_layers"], attention["skip_layers_chosen"]) == ([0], False)
    assert "given by hand wins over `attention.softmax_layers`: layers 0" in (out / "report.md").read_text()
    assert not isinstance(find_decoder_layers(load(out))[0].self_attn, LolcatsAttention)
    _run(tiny_run, "attention.softmax_layers=1", "attention.skip_layers=[0]")  # resumes


def test_softmax_layers_of_every_layer_is_refused_before_anything_is_written(tiny_run):
    recipe, root = tiny_run
    with pytest.raises(ValueError, match=r"attention.softmax_layers=2 would keep all 2 layers of the model as softmax"):
        _run(tiny_run, "attention.softmax_layers=2")
    assert not (root / "out").exists()


def test_a_derived_choice_in_a_recipe_is_made_again(tmp_path, tiny_run):
    """A run's recorded config used as a recipe elsewhere: the derived skip_layers are dropped and chosen again."""
    _, out = _run(tiny_run, "attention.softmax_layers=1", "lora.max_steps=0", "report.enabled=false")
    recorded = json.loads((out / "lolcats_config.json").read_text())["config"]
    recipe = write_recipe(tmp_path / "again.yaml", {**recorded, "out_dir": str(tmp_path / "again")})
    linearize(load_config(str(recipe)))
    assert json.loads((tmp_path / "again" / "layer_choice.json").read_text())["chosen"] == \
        recorded["attention"]["skip_layers"]


def test_block_by_block_stage1_then_the_choice(tmp_path):
    """``blockwise stitch`` hands over to ``linearize``, which chooses after the stitched stage 1 like a joint run."""
    from lolcats import blockwise

    make_tiny_model_folder(tmp_path / "base", num_hidden_layers=4)
    make_corpus(tmp_path / "train", docs=8, words=200)
    cfg = load_config(str(blockwise_recipe(tmp_path, tmp_path / "out", block_size=2)),
                      ["attention.softmax_layers=1", "lora.max_steps=1", "lora.grad_accum=1"])
    blockwise.precompute(cfg)
    blockwise.train(cfg)
    result = blockwise.stitch(cfg)
    (chosen,) = json.loads((tmp_path / "out" / "layer_choice.json").read_text())["chosen"]
    model = load(tmp_path / "out")
    assert [isinstance(layer.self_attn, LolcatsAttention) for layer in find_decoder_layers(model)] == \
        [i != chosen for i in range(4)]
    ids = chunks(1, 20).input_ids
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, result.model(ids).logits, atol=0, rtol=0)
