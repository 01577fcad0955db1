"""Stage 1 and stage 2 under `torchrun --nproc_per_node 2` (gloo, CPU): each optimizer step's micro-batches
are split over the ranks and their gradients summed, so the run equals the single-process one."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file

from lolcats.config import load_config
from lolcats.pipeline import linearize

REPO = Path(__file__).resolve().parents[1]


def test_torchrun_linearize_equals_single_process(tiny_run):
    recipe, root = tiny_run
    data = yaml.safe_load(recipe.read_text())
    data["distill"].update(scheduler="constant")
    data["lora"].update(max_steps=3, grad_accum=2)
    single_recipe = root / "single.yaml"
    single_recipe.write_text(yaml.safe_dump({**data, "out_dir": str(root / "single")}))
    two_recipe = root / "two.yaml"
    two_recipe.write_text(yaml.safe_dump({**data, "out_dir": str(root / "two")}))
    linearize(load_config(str(single_recipe)))

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "lolcats.cli", "linearize", str(two_recipe)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("results in") == 1  # rank 0 speaks
    for stage in ("stage1", "stage2"):
        assert f"{stage}: data-parallel over 2 processes (rank 1 takes micro-batches 1, 1+2" in proc.stderr

    for name in ("attention.safetensors", "adapter/adapter_model.safetensors"):
        a, b = load_file(str(root / "single" / name)), load_file(str(root / "two" / name))
        assert sorted(a) == sorted(b)
        for k in a:  # the same sums in another order: equal to float32 rounding
            torch.testing.assert_close(b[k], a[k], atol=1e-5, rtol=1e-5, msg=k)
    metrics = [json.loads(x) for x in (root / "two" / "metrics.jsonl").read_text().splitlines()]
    steps = [(r["stage"], r["step"]) for r in metrics if "loss" in r]
    assert steps == [("stage1", s) for s in range(1, 5)] + [("stage2", s) for s in range(1, 4)]  # logged once
    single = [json.loads(x) for x in (root / "single" / "metrics.jsonl").read_text().splitlines()]
    assert [r["tokens"] for r in metrics if "loss" in r] == [r["tokens"] for r in single if "loss" in r]
    assert json.loads((root / "two" / "lolcats_config.json").read_text())["status"] == "complete"
