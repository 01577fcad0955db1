"""Kill -9 and resume: the resumed run's weights are bit-identical to an uninterrupted run's."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest

ENTRY = Path(__file__).with_name("fault_entry.py")


def run(recipe, out, fault: str | None = None) -> int:
    """linearize in a subprocess; ``fault`` is a fault point's key at which the process is SIGKILLed."""
    cmd = [sys.executable, str(ENTRY), "kill", fault, "--"] if fault else [sys.executable, "-m", "lolcats.cli"]
    proc = subprocess.run([*cmd, "linearize", str(recipe), f"out_dir={out}"],
                          capture_output=True, text=True, timeout=600)
    if proc.returncode not in (0, -signal.SIGKILL):
        raise AssertionError(f"linearize failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc.returncode


def results(out) -> tuple[bytes, bytes]:
    return ((out / "attention.safetensors").read_bytes(),
            (out / "adapter" / "adapter_model.safetensors").read_bytes())


@pytest.fixture
def reference(tiny_run):
    recipe, root = tiny_run
    assert run(recipe, root / "ref") == 0
    return recipe, root, results(root / "ref")


# grad_accum = 2 in the tiny recipe: micro-step 3 is the second half of optimizer step 2's cycle,
# micro-step 4 the first micro-step after a checkpoint boundary.
@pytest.mark.parametrize("faults", [
    ["stage1:micro4", "stage2:micro3"],  # once in each stage
    ["stage1:micro3"],                   # inside a gradient-accumulation cycle
], ids=["each-stage", "mid-accumulation"])
def test_killed_run_resumes_bit_identical(reference, faults):
    recipe, root, expected = reference
    out = root / "killed"
    for fault in faults:
        assert run(recipe, out, fault) == -signal.SIGKILL
        assert not (out / "report.md").exists()
    assert run(recipe, out) == 0
    # it really resumed: optimizer step 1 of stage 1 ran once, not again after the kill
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert sum(1 for r in records if r.get("stage") == "stage1" and r.get("step") == 1 and "loss" in r) == 1
    got = results(out)
    assert got[0] == expected[0], "attention.safetensors differs from the uninterrupted run"
    assert got[1] == expected[1], "adapter differs from the uninterrupted run"
