"""Sharded training (``model.sharding: fsdp``, FSDP2) under `torchrun --nproc_per_node 2` (gloo, CPU): each rank
holds half of the base and reads only its rows, and the run writes the single process's weights and out_dir."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import make_corpus, make_tiny_model_folder, tiny_recipe, write_recipe
from safetensors.torch import load_file

from lolcats import blockwise
from lolcats.config import ModelConfig, load_config
from lolcats.pipeline import linearize
from lolcats.sharding import STATS_ENV, _rows

REPO = Path(__file__).resolve().parents[1]
RESULTS = ("attention.safetensors", "adapter/adapter_model.safetensors")


def _torchrun(args: list[str], env: dict[str, str] | None = None, entry: list[str] | None = None
              ) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           *(entry or ["-m", "lolcats.cli"]), *args]
    return subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})},
                          timeout=600, cwd=REPO)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """An 8-layer tiny Llama (tied embeddings: the head is read from the embedding's rows) trained by one
    process and, sharded, by two; returns (folder, the sharded run's torchrun output, its per-rank stats)."""
    root = tmp_path_factory.mktemp("sharding")
    make_tiny_model_folder(root / "base", num_hidden_layers=8, tie_word_embeddings=True)
    make_corpus(root / "train", docs=12, words=200)
    make_corpus(root / "ood", docs=2, words=200, seed=100)
    changes = {"distill.scheduler": "constant"}
    linearize(load_config(str(write_recipe(root / "single.yaml", tiny_recipe(root, root / "single", **changes)))))
    sharded = write_recipe(root / "two.yaml", tiny_recipe(root, root / "two", **changes, **{"model.sharding": "fsdp"}))
    stats = root / "stats.jsonl"
    proc = _torchrun(["linearize", str(sharded)], {STATS_ENV: str(stats)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return root, proc, [json.loads(x) for x in stats.read_text().splitlines()]


def test_sharded_run_equals_single_process(runs):
    root, proc, _ = runs
    for name in RESULTS:
        a, b = load_file(str(root / "single" / name)), load_file(str(root / "two" / name))
        assert sorted(a) == sorted(b)
        for k in a:
            torch.testing.assert_close(b[k], a[k], atol=1e-5, rtol=1e-5, msg=k)
    single, two = (json.loads((root / r / "lolcats_config.json").read_text()) for r in ("single", "two"))
    assert two["status"] == "complete"
    # the same base fingerprint (read from the checkpoint's rows), class, and measurements (run on every rank)
    assert two["base_model"] == {**single["base_model"]}
    for key in ("original", "window_only", "converted", "stage1", "stage2"):
        for corpus, value in single["evals"][key].items():
            assert two["evals"][key][corpus] == pytest.approx(value, rel=1e-4), (key, corpus)
    samples = [(root / r / "report.md").read_text().split("## Sample generations")[1] for r in ("single", "two")]
    assert samples[0] == samples[1] and "**the time**" in samples[1]  # generated on every rank, written by rank 0
    assert proc.stdout.count("results in") == 1  # rank 0 speaks
    log = proc.stdout + proc.stderr
    assert "rank 0 of 2 holds" in log and "rank 1 of 2 holds" in log
    for stage in ("stage1", "stage2"):
        assert f"{stage}: data-parallel over 2 processes" in log
    metrics = [json.loads(x) for x in (root / "two" / "metrics.jsonl").read_text().splitlines()]
    assert [(r["stage"], r["step"]) for r in metrics if "loss" in r] == \
        [("stage1", s) for s in range(1, 5)] + [("stage2", s) for s in range(1, 4)]


def test_each_rank_holds_half_the_base_and_never_all_of_it(runs):
    from transformers import AutoModelForCausalLM

    root, _, stats = runs
    base = AutoModelForCausalLM.from_pretrained(str(root / "base"))
    full = sum(p.numel() * p.element_size() for p in base.parameters())  # the tied embedding counted once
    assert sorted(s["rank"] for s in stats) == [0, 1]
    assert all(s["full_bytes"] == full for s in stats)
    assert sum(s["local_bytes"] for s in stats) == full  # the shards partition the base
    for s in stats:
        assert abs(s["local_bytes"] - full / 2) <= 0.02 * full
        # the most it held at once: its half, plus the one or two layers being gathered, plus the rest's other half
        assert s["local_bytes"] < s["peak_bytes"] < 0.75 * full, s


def test_rows_follow_fsdp_even_sharding():
    assert [_rows(10, r, 4) for r in range(4)] == [(0, 3), (3, 6), (6, 9), (9, 10)]
    assert [_rows(3, r, 4) for r in range(4)] == [(0, 1), (1, 2), (2, 3), (3, 3)]


def test_sharding_setting_is_checked():
    with pytest.raises(ValueError, match=r"model.sharding='fsdp2' is not valid; choose one of 'none', 'fsdp'"):
        ModelConfig(sharding="fsdp2")


def test_killed_rank_resumes_to_the_uninterrupted_sharded_weights(runs, tmp_path):
    root, _, _ = runs
    recipe = write_recipe(tmp_path / "killed.yaml", tiny_recipe(root, tmp_path / "killed", **{
        "distill.scheduler": "constant", "model.sharding": "fsdp"}))
    # micro-step 3 of stage 2 is rank 1's (step 2's second micro-batch): rank 1 is killed with SIGKILL there
    killed = _torchrun([str(recipe)], entry=[str(REPO / "tests" / "fault_entry.py"), "kill", "stage2:micro3", "--",
                                              "linearize"])
    assert killed.returncode != 0
    assert "Signal 9 (SIGKILL)" in killed.stderr or "exitcode  : -9" in killed.stderr, killed.stderr[-2000:]
    assert (tmp_path / "killed" / "train_state" / "stage2").is_dir()
    assert not (tmp_path / "killed" / "adapter").exists()
    rerun = _torchrun(["linearize", str(recipe)])
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "stage2: resumed at optimizer step 1" in rerun.stderr
    for name in RESULTS:
        a, b = load_file(str(root / "two" / name)), load_file(str(tmp_path / "killed" / name))
        assert all(torch.equal(a[k], b[k]) for k in a), name


@pytest.mark.parametrize("name", ["llama3_1_70b", "llama3_1_405b"])
def test_big_recipe_pipeline_on_the_tiny_model(tmp_path, name):
    """The 70B / 405B recipe's own commands (block-by-block stage 1 on two ranks, then `blockwise stitch` with a
    sharded stage 2 on two ranks), its keys changed only to point at a tiny Llama and local text."""
    make_tiny_model_folder(tmp_path / "base", num_hidden_layers=4)
    make_corpus(tmp_path / "train", docs=8, words=200)
    r = yaml.safe_load((REPO / "recipes" / f"{name}.yaml").read_text())
    assert r["model"]["sharding"] == "fsdp"
    overrides = [f"out_dir={tmp_path / 'out'}", f"model.name_or_path={tmp_path / 'base'}", "model.device=cpu",
                 "model.dtype=float32", "threads=1", f"data.train={tmp_path / 'train'}",
                 f"data.eval_out_of_domain={tmp_path / 'train'}", "data.seq_len=32", "data.heldout_chunks=2",
                 "data.eval_windows=1", "distill.epochs=0", "distill.max_steps=2", "distill.grad_accum=2",
                 "distill.eval_every=2", "lora.epochs=0", "lora.max_steps=2", "lora.grad_accum=2", "lora.eval_every=2",
                 "lora.checkpoint_every=1", "attention.window_size=8", "attention.feature_dim=8",
                 "blockwise.block_size=2", "blockwise.shard_dtype=float32", "blockwise.chunks_per_shard=16",
                 "blockwise.model_config=", "report.sample_tokens=2"]
    recipe = str(REPO / "recipes" / f"{name}.yaml")
    subprocess.run([sys.executable, "-m", "lolcats.cli", "blockwise", "precompute", recipe, *overrides], check=True,
                   cwd=REPO, capture_output=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=600)
    train = _torchrun(["blockwise", "train", recipe, *overrides])
    assert train.returncode == 0, train.stderr[-3000:]
    stitch = _torchrun(["blockwise", "stitch", recipe, *overrides])
    assert stitch.returncode == 0, stitch.stderr[-3000:]
    log = stitch.stdout + stitch.stderr
    assert "rank 0 of 2 holds" in log and "stage2: data-parallel over 2 processes" in log
    record = json.loads((tmp_path / "out" / "lolcats_config.json").read_text())
    assert record["status"] == "complete" and record["stages"]["stage1"]["blockwise"]
    assert record["config"]["model"]["sharding"] == "fsdp"
    # the same stage 2 in one process from the same blocks gives the same adapter
    cfg = load_config(recipe, [*overrides[1:], f"out_dir={tmp_path / 'single'}", "model.sharding=none"])
    import shutil

    shutil.copytree(tmp_path / "out" / "blockwise", tmp_path / "single" / "blockwise")
    blockwise.stitch(cfg)
    a = load_file(str(tmp_path / "single" / RESULTS[1]))
    b = load_file(str(tmp_path / "out" / RESULTS[1]))
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=1e-5, rtol=1e-5, msg=k)
