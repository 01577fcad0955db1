"""Long-context evaluation: the window + attention-sinks baseline (mask, perplexity, by-position metrics,
``eval ppl --window --sinks``), the pipeline's third baseline and its ``report.long_context`` section."""

from __future__ import annotations

import json
import math

import pytest
import torch

from lolcats.cli import main
from lolcats.config import load_config
from lolcats.data import Chunks
from lolcats.eval.perplexity import perplexity, sliding_window_mask, token_metrics
from lolcats.pipeline import linearize
from tests.conftest import build_tiny, make_corpus, make_tiny_model_folder, tiny_recipe, write_recipe

CPU = torch.device("cpu")


def _reference_mask(t: int, window: int, sinks: int) -> torch.Tensor:
    allowed = torch.zeros(t, t, dtype=torch.bool)
    for i in range(t):
        for j in range(t):
            allowed[i, j] = j <= i and (i - j < window or j < sinks)
    return allowed


@pytest.mark.parametrize("t,window,sinks", [(9, 3, 0), (9, 3, 2), (9, 1, 4), (5, 8, 1), (6, 2, 10), (1, 1, 1)])
def test_sinks_mask_matches_a_hand_built_reference(t, window, sinks):
    mask = sliding_window_mask(t, window, torch.float32, CPU, sinks=sinks)
    assert mask.shape == (1, 1, t, t)
    assert torch.equal(mask[0, 0] == 0, _reference_mask(t, window, sinks))
    assert set(mask.unique().tolist()) <= {0.0, torch.finfo(torch.float32).min}


def test_mask_rejects_bad_window_and_sinks():
    with pytest.raises(ValueError, match="window=0 must be a positive integer"):
        sliding_window_mask(4, 0, torch.float32, CPU)
    with pytest.raises(ValueError, match="sinks=-1 must be a non-negative integer"):
        sliding_window_mask(4, 2, torch.float32, CPU, sinks=-1)


@pytest.fixture(scope="module")
def model_and_chunks():
    model = build_tiny("llama")
    ids = torch.randint(3, model.config.vocab_size, (2, 96), generator=torch.Generator().manual_seed(0))
    return model, Chunks(ids, ids.clone())


def test_window_covering_the_sequence_equals_the_plain_model(model_and_chunks):
    model, chunks = model_and_chunks
    plain = perplexity(model, chunks)
    assert math.isclose(perplexity(model, chunks, 96), plain, rel_tol=1e-5)
    assert math.isclose(perplexity(model, chunks, 96, sinks=3), plain, rel_tol=1e-5)
    assert math.isclose(perplexity(model, chunks, 1, sinks=96), plain, rel_tol=1e-5)  # sinks cover everything
    buckets = ((0, 48), (48, 96))
    full = token_metrics(model, chunks, buckets=buckets)
    windowed = token_metrics(model, chunks, buckets=buckets, window=96, sinks=2)
    assert math.isclose(windowed["ppl"], full["ppl"], rel_tol=1e-5)
    for name, b in full["by_position"].items():
        assert math.isclose(windowed["by_position"][name]["ppl"], b["ppl"], rel_tol=1e-5)


def test_sinks_zero_equals_window_only_and_sinks_change_the_result(model_and_chunks):
    model, chunks = model_and_chunks
    window_only = perplexity(model, chunks, 8)
    assert perplexity(model, chunks, 8, sinks=0) == window_only
    with_sinks = perplexity(model, chunks, 8, sinks=4)
    assert with_sinks != window_only and with_sinks != perplexity(model, chunks)
    by_pos = token_metrics(model, chunks, slice_len=40, window=8, sinks=4)
    assert math.isclose(by_pos["ppl"], with_sinks, rel_tol=1e-5)
    assert math.isclose(token_metrics(model, chunks, window=8)["ppl"], window_only, rel_tol=1e-5)
    model.config._attn_implementation = "eager"  # the additive mask works for eager attention too
    try:
        assert math.isclose(perplexity(model, chunks, 8, sinks=4), with_sinks, rel_tol=1e-4)
    finally:
        model.config._attn_implementation = "sdpa"


# ------------------------------------------------------------------------------------- the CLI

@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    make_tiny_model_folder(root / "base")
    make_corpus(root / "text", docs=2, words=400)
    return root


def test_eval_ppl_window_and_sinks_cli(tiny_folder, tmp_path, capsys):
    out = tmp_path / "ppl.json"
    rc = main(["eval", "ppl", str(tiny_folder / "base"), "--data", str(tiny_folder / "text"), "--seq-len", "300",
               "--windows", "1", "--window", "16", "--sinks", "4", "--out", str(out)])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "perplexity (window 16 + 4 sinks)" in printed and "| 0–512 |" in printed
    record = json.loads(out.read_text())
    assert record["window"] == 16 and record["sinks"] == 4 and set(record["by_position"]) == {"0–512"}
    main(["eval", "ppl", str(tiny_folder / "base"), "--data", str(tiny_folder / "text"), "--seq-len", "300",
          "--windows", "1", "--out", str(out)])
    plain = json.loads(out.read_text())
    assert plain["window"] is None and plain["sinks"] is None and plain["ppl"] != record["ppl"]


@pytest.mark.parametrize("args,expect", [
    (["--sinks", "4"], "--sinks 4 needs --window"),
    (["--window", "0"], "argument --window: 0 must be a positive whole number"),
    (["--window", "8", "--sinks", "-1"], "argument --sinks: -1 must be 0 or more"),
])
def test_eval_ppl_window_errors(tiny_folder, capsys, args, expect):
    try:
        rc = main(["eval", "ppl", str(tiny_folder / "base"), "--data", str(tiny_folder / "text"), *args])
    except SystemExit as e:  # argparse
        rc = e.code
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert rc == 2 and len(err) == 1 and expect in err[0], err


# ------------------------------------------------------------------------------------- the pipeline

LONG = {"report.long_context": True, "report.long_context_seq_len": 128, "report.long_context_windows": 2,
        "report.passkey_lengths": [128, 160], "report.passkey_trials": 1, "data.eval_seq_len": 32,
        "distill.max_steps": 2, "lora.max_steps": 2}


@pytest.fixture(scope="module")
def long_run(tmp_path_factory):
    """A finished tiny run with report.long_context on; returns (recipe, root)."""
    root = tmp_path_factory.mktemp("long")
    make_tiny_model_folder(root / "base")
    make_corpus(root / "train", docs=12, words=200)
    make_corpus(root / "ood", docs=2, words=200, seed=100)
    recipe = write_recipe(root / "recipe.yaml",
                          tiny_recipe(root, **LONG, **{"report.long_context_data": str(root / "ood")}))
    linearize(load_config(str(recipe)))
    return recipe, root


def test_long_context_run_reports_and_a_rerun_uses_the_cache(long_run, monkeypatch):
    recipe, root = long_run
    out = root / "out"
    report = (out / "report.md").read_text()
    assert "## Long context" in report and "| model | 0–512 ppl | all |" in report
    for row in ("| original (softmax) |", "| sliding window only (8) |",
                "| sliding window + attention sinks (8 + 4 sinks) |", "| linearized (final model) |"):
        assert row in report
    assert "| model | 128 | 160 | all |" in report
    assert "| sliding window + 4 attention sinks |" in report and "closure from window+sinks in-domain" in report
    lc = json.loads((out / "lolcats_config.json").read_text())["evals"]["long_context"]
    assert set(lc["perplexity"]) == {"original", "window_only", "window_sinks", "final"}
    assert set(lc["passkey"]) == {"original", "final"}
    assert lc["perplexity"]["window_sinks"]["sinks"] == 4 and lc["seq_len"] == 128
    cached = json.loads((out / "train_state" / "evals.json").read_text())
    assert sum(key.startswith(("long_context", "passkey")) for key in cached) == 6 and "window_sinks 4" in cached

    def fail(*args, **kwargs):
        raise AssertionError("a finished run measured again")

    monkeypatch.setattr("lolcats.eval.long_context.token_metrics", fail)
    monkeypatch.setattr("lolcats.eval.long_context.passkey_accuracy", fail)
    monkeypatch.setattr("lolcats.pipeline.perplexity", fail)
    linearize(load_config(str(recipe)))
    assert (out / "report.md").read_text() == report


def test_window_on_a_linearized_out_dir_is_an_error(long_run, capsys):
    _, root = long_run
    rc = main(["eval", "ppl", str(root / "out"), "--data", str(root / "ood"), "--seq-len", "16", "--window", "4"])
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert rc == 2 and len(err) == 1 and "is linearized" in err[0] and "drop --window" in err[0], err


def test_long_context_off_measures_nothing_extra(tmp_path):
    make_tiny_model_folder(tmp_path / "base")
    make_corpus(tmp_path / "train", docs=12, words=200)
    make_corpus(tmp_path / "ood", docs=2, words=200, seed=100)
    recipe = write_recipe(tmp_path / "recipe.yaml", tiny_recipe(
        tmp_path, **{**LONG, "report.long_context": False, "report.baseline_sinks": 0, "lora.max_steps": 0}))
    linearize(load_config(str(recipe)))
    report = (tmp_path / "out" / "report.md").read_text()
    assert "Long context" not in report and "window+sinks" not in report and "attention sinks" not in report
    cached = json.loads((tmp_path / "out" / "train_state" / "evals.json").read_text())
    assert not any(key.startswith(("long_context", "passkey", "window_sinks")) for key in cached)
    assert "long_context" not in json.loads((tmp_path / "out" / "lolcats_config.json").read_text())["evals"]
