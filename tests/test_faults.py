"""Kill -9 at seeded-random fault points of stage 1, stage 2, blockwise precompute and blockwise train, resume,
and compare sha256 of every result file with an uninterrupted run's.

Each scenario first records, in an uninterrupted run, every fault point's key in the order passed
(``tests/fault_entry.py record``). Three keys of the scenario's part of the run are drawn with a fixed seed, at
least one of them inside a write (a checkpoint, the adapter, ``attention.safetensors``, a shard or the manifest,
after its temporary file was started and before its rename). In one fresh output folder the CLI is then killed
at the first key, rerun and killed at the second, rerun and killed at the third, and rerun to the end.

Keys are drawn only among those passed once in the recorded run (a repeated key would kill the rerun at
whichever occurrence comes first), and from three different *units* (one checkpoint save, one file write,
one micro-step, one shard): a resumed run replays everything from its resume point on, which lies before
the previous kill's unit, so a later unit's key is always reached again; a key later in the *same* unit may
not be (a checkpoint whose folder was renamed into place is resumed from, and its ``LATEST`` write is not
redone), so two keys never share a unit.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import make_corpus, make_tiny_model_folder, tiny_recipe, write_recipe

from lolcats.io import sha256_file

REPO = Path(__file__).resolve().parents[1]
ENTRY = REPO / "tests" / "fault_entry.py"
SEEDS = {"stage1": 1, "stage2": 2, "precompute": 3, "train": 4}
ADAPTER_WEIGHTS = Path("adapter") / "adapter_model.safetensors"


# ------------------------------------------------------------------------------------------------ helpers
def cli(args: list[str], mode: str | None = None, arg: str | None = None) -> subprocess.CompletedProcess:
    """The lolcats CLI in a subprocess; ``mode`` ``kill``/``record`` runs it through tests/fault_entry.py."""
    cmd = [sys.executable, str(ENTRY), mode, str(arg), "--"] if mode else [sys.executable, "-m", "lolcats.cli"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([*cmd, *args], capture_output=True, text=True, cwd=REPO, env=env, timeout=600)


def record(args: list[str], keys_file: Path) -> list[str]:
    """Run ``args`` uninterrupted, returning every fault point's key in the order passed."""
    proc = cli(args, "record", keys_file)
    assert proc.returncode == 0, f"uninterrupted `{' '.join(args[:2])}` failed:\n{proc.stderr[-3000:]}"
    return keys_file.read_text().splitlines()


def unit(key: str) -> str:
    """The checkpoint save, file write, micro-step or shard a key belongs to."""
    if key.startswith("write:"):  # an unscoped write: write:<file>:<phase> (a folder's name ends with "/")
        return key.rsplit(":", 1)[0]
    if "/" in key:  # a scoped point: stage1:save3/…, shard:train/block-000/shard-00000.safetensors/…
        return key.split("/write:")[0] if key.startswith("shard:") else key.split("/")[0]
    return key.removesuffix(":loss")  # stage1:micro3 and stage1:micro3:loss: the same micro-step


def inside_write(key: str) -> bool:
    """A point after a file's temporary copy was begun and before it was renamed into place."""
    return key.endswith((":half", ":before-rename", "/trainer.pt:begin"))


def choose(keys: list[str], belongs, seed: int) -> list[str]:
    """Three keys of one part of the run (``belongs(key)``), passed once each, from three different units,
    at least one inside a write; in the order the run passes them."""
    once = [k for k in keys if keys.count(k) == 1 and belongs(k)]
    writes = [k for k in once if inside_write(k)]
    assert len({unit(k) for k in once}) >= 3 and writes, f"too few fault points to choose from: {once}"
    rng = random.Random(seed)
    chosen = [rng.choice(writes)]
    while len(chosen) < 3:
        k = rng.choice(once)
        if unit(k) not in {unit(c) for c in chosen}:
            chosen.append(k)
    return sorted(chosen, key=keys.index)


def kill_chain(args: list[str], chosen: list[str]) -> None:
    """Kill ``args`` at each chosen key in turn (one rerun per key, same folder), then rerun to the end."""
    print(f"`{' '.join(args[:2])}` killed at {chosen}")
    for i, key in enumerate(chosen):
        proc = cli(args, "kill", key)
        assert proc.returncode == -signal.SIGKILL, (
            f"run {i + 1} of the kill chain {chosen} was to be killed at {key!r} but ended with "
            f"{proc.returncode}:\n{proc.stderr[-3000:]}")
    proc = cli(args)
    assert proc.returncode == 0, f"rerun after kills at {chosen} failed ({proc.returncode}):\n{proc.stderr[-3000:]}"


def shas(root: Path, pattern: str) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): sha256_file(p) for p in sorted(root.glob(pattern))}


# ------------------------------------------------------------------------------------------------ linearize
@pytest.fixture(scope="module")
def linearize_ref(tmp_path_factory):
    """A tiny local recipe (stage 1: 4 steps, stage 2: 3 steps, a checkpoint every step) and its
    uninterrupted run: (recipe, root, recorded keys, sha256 of attention.safetensors and the adapter)."""
    root = tmp_path_factory.mktemp("faults-linearize")
    make_tiny_model_folder(root / "base")
    make_corpus(root / "train", docs=12, words=200)
    make_corpus(root / "ood", docs=2, words=200, seed=100)
    path = write_recipe(root / "recipe.yaml", tiny_recipe(root, root / "ref", **{"report.enabled": False}))
    keys = record(["linearize", str(path)], root / "keys.txt")
    out = root / "ref"
    return path, root, keys, (sha256_file(out / "attention.safetensors"), sha256_file(out / ADAPTER_WEIGHTS))


def _stage_keys(stage: str):
    # a stage's own points, and the write of what it produces (attention.safetensors, the adapter folder)
    result = {"stage1": "write:attention.safetensors:", "stage2": "write:adapter/:"}[stage]
    return lambda k: k.startswith((f"{stage}:", result))


@pytest.mark.parametrize("stage", ["stage1", "stage2"])
def test_linearize_killed_at_three_seeded_points_resumes_bit_identical(linearize_ref, stage):
    recipe, root, keys, expected = linearize_ref
    chosen = choose(keys, _stage_keys(stage), SEEDS[stage])
    out = root / f"killed-{stage}"
    kill_chain(["linearize", str(recipe), f"out_dir={out}"], chosen)
    got = (sha256_file(out / "attention.safetensors"), sha256_file(out / ADAPTER_WEIGHTS))
    assert got[0] == expected[0], f"attention.safetensors differs after kills at {chosen}"
    assert got[1] == expected[1], f"adapter weights differ after kills at {chosen}"


def test_damaged_resume_checkpoint_falls_back_to_the_previous_one(linearize_ref):
    """A flipped byte in the newest stage-1 checkpoint: the rerun names the file, resumes from the one
    before it, and still ends bit-identical."""
    recipe, root, keys, expected = linearize_ref
    key = "stage1:micro6"  # after the step-3 checkpoint: steps 2 and 3 are kept
    assert key in keys
    out = root / "damaged"
    args = ["linearize", str(recipe), f"out_dir={out}"]
    assert cli(args, "kill", key).returncode == -signal.SIGKILL
    steps = sorted((out / "train_state" / "stage1").glob("step-*"))
    assert [p.name for p in steps] == ["step-00000002", "step-00000003"]
    weights = steps[-1] / "weights.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0x01
    weights.write_bytes(bytes(data))
    proc = cli(args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "WARNING" in proc.stderr and f"{weights} is damaged" in proc.stderr, proc.stderr[-3000:]
    assert f"resumed at optimizer step 2 from {steps[0]}" in proc.stderr, proc.stderr[-3000:]
    assert sha256_file(out / "attention.safetensors") == expected[0]
    assert sha256_file(out / ADAPTER_WEIGHTS) == expected[1]


# ------------------------------------------------------------------------------------------------ blockwise
SHARDS = "*/block-*/shard-*.safetensors"
BLOCK_WEIGHTS = "block-*/attention.safetensors"


@pytest.fixture(scope="module")
def blockwise_ref(tmp_path_factory):
    """A 4-layer tiny Llama in blocks of 2 (8 shards), 4 steps a block with a checkpoint every step, and its
    uninterrupted precompute and train: (recipe, root, precompute keys, train keys, reference out_dir)."""
    root = tmp_path_factory.mktemp("faults-blockwise")
    make_tiny_model_folder(root / "base", num_hidden_layers=4)
    make_corpus(root / "train", docs=8, words=200)
    recipe = {
        "out_dir": str(root / "ref"), "seed": 0, "threads": 1,
        "model": {"name_or_path": str(root / "base"), "device": "cpu"},
        "attention": {"variant": "terraced", "window_size": 8, "feature_dim": 8, "feature_init": "kaiming"},
        "data": {"train": str(root / "train"), "train_filter": "", "eval_in_domain": "heldout",
                 "eval_out_of_domain": str(root / "train"), "seq_len": 32, "heldout_chunks": 2, "eval_windows": 1},
        "distill": {"max_steps": 4, "grad_accum": 2, "eval_every": 2, "checkpoint_every": 1},
        "lora": {"max_steps": 0}, "report": {"enabled": False},
        "blockwise": {"block_size": 2, "shard_dtype": "float32", "chunks_per_shard": 16},
    }
    path = root / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    pre = record(["blockwise", "precompute", str(path)], root / "precompute-keys.txt")
    train = record(["blockwise", "train", str(path)], root / "train-keys.txt")
    return path, root, pre, train, root / "ref"


def test_blockwise_precompute_killed_at_three_seeded_points_rewrites_identical_shards(blockwise_ref):
    recipe, root, keys, _, ref = blockwise_ref
    chosen = choose(keys, lambda k: k.startswith(("precompute:", "shard:")), SEEDS["precompute"])
    out = root / "killed-precompute"
    kill_chain(["blockwise", "precompute", str(recipe), f"out_dir={out}"], chosen)
    expected = shas(ref / "blockwise" / "hidden", SHARDS)
    hidden = out / "blockwise" / "hidden"
    got = shas(hidden, SHARDS)
    assert len(expected) == 8 and got == expected, f"hidden-state shards differ after kills at {chosen}"
    manifest = json.loads((hidden / "manifest.json").read_text())["shards"]
    assert {n: e["sha256"] for n, e in manifest.items()} == expected, f"manifest after kills at {chosen}"
    assert manifest == json.loads((ref / "blockwise" / "hidden" / "manifest.json").read_text())["shards"]
    assert not [p for p in hidden.rglob("*") if p.name.endswith(".tmp")], "temporary files left behind"


def test_blockwise_train_killed_at_three_seeded_points_resumes_bit_identical(blockwise_ref):
    recipe, root, _, keys, ref = blockwise_ref
    chosen = choose(keys, lambda k: k.startswith("block"), SEEDS["train"])
    out = root / "killed-train"
    kill_chain(["blockwise", "train", str(recipe), f"out_dir={out}",
                f"blockwise.hidden_dir={ref / 'blockwise' / 'hidden'}"], chosen)
    expected = shas(ref / "blockwise", BLOCK_WEIGHTS)
    got = shas(out / "blockwise", BLOCK_WEIGHTS)
    assert len(expected) == 2 and got == expected, f"block weights differ after kills at {chosen}"


def test_safetensors_writes_are_byte_deterministic(tmp_path):
    """The same tensors and metadata give the same bytes (a resumed run's files must equal an uninterrupted
    one's); several metadata keys, which safetensors orders at random, are refused."""
    import torch
    from safetensors import safe_open

    from lolcats.io import atomic_save_safetensors

    tensors = {"layers.2.window_factor": torch.arange(4.0), "layers.2.feature_map_q.weight": torch.ones(2, 3)}
    metadata = {"lolcats": '{"block": 1, "format": "lolcats-attention", "note": "\u00fc"}'}
    digests = set()
    for i in range(12):
        atomic_save_safetensors(tensors, tmp_path / f"w{i}.safetensors", metadata=metadata)
        digests.add(sha256_file(tmp_path / f"w{i}.safetensors"))
    assert len(digests) == 1
    with safe_open(str(tmp_path / "w0.safetensors"), "pt") as f:
        assert f.metadata() == metadata
        assert all(torch.equal(f.get_tensor(n), t) for n, t in tensors.items())
    with pytest.raises(ValueError, match="at most one metadata key"):
        atomic_save_safetensors(tensors, tmp_path / "two.safetensors", metadata={"format": "x", "block": "1"})
    assert not (tmp_path / "two.safetensors").exists()
