"""Block-by-block stage 1 (docs/blockwise.md): plan, precompute, train, stitch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import yaml
from conftest import make_corpus, make_tiny_model_folder
from safetensors.torch import load_file

from lolcats import blockwise
from lolcats.blockwise.shards import HiddenShards, ShardError, file_sha256
from lolcats.blockwise.stitch import merge_blocks
from lolcats.cli import main
from lolcats.config import load_config
from lolcats.pipeline import linearize

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> Path:
    """A 4-layer tiny Llama saved as safetensors, and a small local corpus."""
    root = tmp_path_factory.mktemp("blockwise")
    make_tiny_model_folder(root / "base", num_hidden_layers=4)
    make_corpus(root / "train", docs=8, words=200)
    return root


LONG = {"sink_tokens": 2, "decay": True, "decay_init": 0.9}  # the long-context options, trained block by block too


def recipe(assets: Path, out: Path, attention_ce_weight: float = 0.0, long: bool = False, **blockwise_cfg) -> Path:
    """Stage 1 with a constant lr, no clipping, one held-out evaluation at the end (so the kept weights
    are the last ones): the conditions under which blockwise and joint training must agree."""
    r = {"out_dir": str(out), "seed": 0, "threads": 1,
         "model": {"name_or_path": str(assets / "base"), "device": "cpu"},
         "attention": {"variant": "terraced", "window_size": 8, "feature_dim": 8, "feature_init": "kaiming",
                       **(LONG if long else {})},
         "data": {"train": str(assets / "train"), "train_filter": "", "eval_in_domain": "heldout",
                  "eval_out_of_domain": str(assets / "train"), "seq_len": 32, "heldout_chunks": 2, "eval_windows": 1},
         "distill": {"max_steps": 5, "grad_accum": 2, "eval_every": 5, "checkpoint_every": 2,
                     "scheduler": "constant", "max_grad_norm": 0.0, "attention_ce_weight": attention_ce_weight},
         "lora": {"max_steps": 0}, "report": {"enabled": False},
         "blockwise": {"block_size": 1, "shard_dtype": "float32", "chunks_per_shard": 16, **blockwise_cfg}}
    path = out.parent / f"{out.name}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(r))
    return path


@pytest.fixture(scope="module")
def joint(assets, tmp_path_factory) -> Callable[[float, bool], dict[str, torch.Tensor]]:
    """Joint stage 1's weights for an attention cross-entropy weight, with or without the long-context
    options (each trained once per module)."""
    done: dict[tuple[float, bool], dict[str, torch.Tensor]] = {}

    def weights(attention_ce_weight: float, long: bool = False) -> dict[str, torch.Tensor]:
        if (attention_ce_weight, long) not in done:
            out = tmp_path_factory.mktemp("joint") / "out"
            linearize(load_config(str(recipe(assets, out, attention_ce_weight, long))))
            done[attention_ce_weight, long] = load_file(str(out / "attention.safetensors"))
        return done[attention_ce_weight, long]

    return weights


@pytest.mark.parametrize("k,ce,long", [(1, 0.0, False), (2, 0.0, False), (2, 0.5, False), (2, 0.0, True)],
                         ids=["k1", "k2", "k2-attention-ce", "k2-sinks-decay"])
def test_blockwise_stage1_equals_joint_stage1(assets, joint, tmp_path, k, ce, long):
    """Blockwise feature maps equal joint stage 1's (atol 1e-5), for k = 1 and k = 2, with Hedgehog's
    attention cross-entropy on (weighted 1/L per layer like the MSE), and with sink tokens and a trained
    decay (whose λ is stitched with the maps).

    Why they must: in joint stage 1 the teacher's output flows on, so every layer's input is the original
    model's hidden state whatever the feature maps are, and layer l's weights receive the gradient of
    ``mse_scale · MSE_l / L`` and nothing else. A block fed those same hidden states (precomputed, fp32
    here so nothing is rounded), with each layer's loss weighted by the same 1/L of the whole model
    ("per-layer loss normalisation"), gets identical gradients; AdamW updates each parameter from its own
    gradient alone. What couples layers must be off: global-norm gradient clipping and the plateau
    scheduler (both read all layers), and the best-checkpoint choice (one evaluation at the end keeps the
    last weights). The data order must be the same (chunk order is a function of seed and epoch only), and
    so must the initial weights (each layer's init is seeded by (seed, layer index)).
    """
    cfg = load_config(str(recipe(assets, tmp_path / "out", ce, long, block_size=k)))
    pre = blockwise.precompute(cfg)
    assert pre.written and not pre.problems
    results = blockwise.train(cfg)
    assert [r["block"] for r in results] == list(range(4 // k))
    assert all(r["steps"] == 5 and r["tokens"] == 5 * 2 * 32 for r in results)  # steps x grad_accum x seq_len
    merged, _ = merge_blocks(cfg)
    expected = joint(ce, long)
    assert sorted(merged) == sorted(expected)
    assert any(n.endswith("decay_logit") for n in expected) == long
    for name, t in expected.items():
        torch.testing.assert_close(merged[name], t, atol=1e-5, rtol=0, msg=name)
    # and training moved them away from their (seeded) initial values
    init = _initial_state(cfg)
    assert max((merged[n] - init[n]).abs().max().item() for n in init) > 1e-3


def _initial_state(cfg) -> dict[str, torch.Tensor]:
    from transformers import AutoModelForCausalLM

    from lolcats.checkpoint import attention_state
    from lolcats.convert import convert_model

    model = AutoModelForCausalLM.from_pretrained(cfg.model.name_or_path)
    convert_model(model, cfg.attention, seed=cfg.seed)
    return {n: t.detach().clone() for n, t in attention_state(model).items()}


def _torchrun(args: list[str], env_extra: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env_extra or {})}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "lolcats.cli", *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600, cwd=REPO)


def test_torchrun_two_ranks_equal_single_process(assets, tmp_path):
    """`torchrun --nproc_per_node 2` (gloo, CPU): 4 blocks, two per rank, same weights as one process."""
    hidden = str(tmp_path / "hidden")
    single = load_config(str(recipe(assets, tmp_path / "single", hidden_dir=hidden)))
    blockwise.precompute(single)
    blockwise.train(single)
    two = recipe(assets, tmp_path / "two", hidden_dir=hidden)
    proc = _torchrun(["blockwise", "train", str(two)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    log = proc.stdout + proc.stderr
    assert "rank 0/2 trains blocks [0, 2]" in log and "rank 1/2 trains blocks [1, 3]" in log
    assert "| 3 | 3–3 |" in proc.stdout  # rank 0 prints every block's summary row
    for b in range(4):
        a = load_file(str(tmp_path / "single" / "blockwise" / f"block-{b:03d}" / "attention.safetensors"))
        c = load_file(str(tmp_path / "two" / "blockwise" / f"block-{b:03d}" / "attention.safetensors"))
        assert sorted(a) == sorted(c) and all(n.startswith(f"layers.{b}.") for n in a)
        for n in a:
            torch.testing.assert_close(c[n], a[n], atol=0, rtol=0)


def test_killed_block_resumes_to_the_same_weights(assets, tmp_path):
    hidden = str(tmp_path / "hidden")
    ref = load_config(str(recipe(assets, tmp_path / "ref", hidden_dir=hidden)))
    blockwise.precompute(ref)
    blockwise.train(ref, blocks=[1])
    path = recipe(assets, tmp_path / "killed", hidden_dir=hidden)
    cmd = [sys.executable, "-m", "lolcats.cli", "blockwise", "train", str(path), "--blocks", "1"]
    entry = [sys.executable, str(REPO / "tests" / "fault_entry.py"), "kill", "block1:micro5", "--"]
    killed = subprocess.run([*entry, *cmd[3:]], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert killed.returncode == -9
    assert not (tmp_path / "killed" / "blockwise" / "block-001" / "result.json").exists()
    resumed = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    steps = [json.loads(x)["step"] for x in
             (tmp_path / "killed" / "blockwise" / "block-001" / "metrics.jsonl").read_text().splitlines()
             if "loss" in json.loads(x)]
    assert steps.count(1) == 1 and steps[-1] == 5  # steps 1-2 were not redone
    a = load_file(str(tmp_path / "ref" / "blockwise" / "block-001" / "attention.safetensors"))
    b = load_file(str(tmp_path / "killed" / "blockwise" / "block-001" / "attention.safetensors"))
    for n in a:
        torch.testing.assert_close(b[n], a[n], atol=0, rtol=0)


def _shards(root: Path) -> dict[str, tuple[str, int]]:
    return {p.relative_to(root).as_posix(): (file_sha256(p), p.stat().st_mtime_ns)
            for p in sorted(root.glob("*/block-*/shard-*.safetensors"))}


def test_precompute_detects_and_repairs_exactly_the_bad_shard(assets, tmp_path):
    cfg = load_config(str(recipe(assets, tmp_path / "out", block_size=2)))
    root = blockwise.precompute(cfg).hidden_dir
    before = _shards(root)
    manifest = json.loads((root / "manifest.json").read_text())
    assert len(before) == len(manifest["shards"])
    assert {(e["split"], e["block"]) for e in manifest["shards"].values()} == {
        (s, b) for s in ("train", "heldout") for b in (0, 1)}
    entry = manifest["shards"]["train/block-001/shard-00000.safetensors"]
    assert entry["shape"][1:] == [32, 64] and entry["dtype"] == "float32" and entry["tokens"][0] == 0

    def rerun_repairs(name: str, problem: str) -> None:
        with pytest.raises(ShardError, match=problem) as e:
            HiddenShards(root, name.split("/")[0], int(name.split("/")[1][-3:]), torch.float32)
        assert name in str(e.value) and "precompute" in str(e.value)
        result = blockwise.precompute(cfg)
        assert result.written == [name]
        assert any(name in p for p in result.problems)
        after = _shards(root)
        assert after[name][0] == before[name][0]  # rewritten byte for byte
        assert all(after[n] == before[n] for n in before if n != name)  # nothing else touched
        before[name] = after[name]

    # one flipped byte in the tensor data
    name = "train/block-001/shard-00000.safetensors"
    data = bytearray((root / name).read_bytes())
    data[-100] ^= 0x40
    (root / name).write_bytes(bytes(data))
    rerun_repairs(name, "corrupt")

    # a truncated shard
    name = "heldout/block-000/shard-00000.safetensors"
    data = (root / name).read_bytes()
    (root / name).write_bytes(data[: len(data) // 2])
    rerun_repairs(name, "truncated")

    # a deleted manifest: training refuses; precompute rebuilds it from the shards, recomputing nothing
    (root / "manifest.json").unlink()
    with pytest.raises(ShardError, match="no manifest"):
        HiddenShards(root, "train", 0, torch.float32)
    assert main(["blockwise", "train", str(tmp_path / "out.yaml")]) == 2
    result = blockwise.precompute(cfg)
    assert result.written == [] and any("manifest" in p and "missing" in p for p in result.problems)
    assert json.loads((root / "manifest.json").read_text())["shards"] == manifest["shards"]
    assert _shards(root) == before


def test_precompute_in_waves_writes_the_same_shards(assets, tmp_path):
    """Holding at most 16 chunks in memory (several passes over the layers) changes nothing on disk."""
    one = blockwise.precompute(load_config(str(recipe(assets, tmp_path / "one", block_size=2))))
    waves = blockwise.precompute(load_config(str(recipe(assets, tmp_path / "waves", block_size=2,
                                                        max_inflight_chunks=16))))
    assert waves.inflight_bytes <= 16 * 32 * 64 * 4 < one.inflight_bytes
    assert _shards(waves.hidden_dir).keys() == _shards(one.hidden_dir).keys()
    assert [v[0] for v in _shards(waves.hidden_dir).values()] == [v[0] for v in _shards(one.hidden_dir).values()]


def test_precompute_refuses_without_disk_space(assets, tmp_path, monkeypatch):
    import shutil

    from lolcats.blockwise import shards

    cfg = load_config(str(recipe(assets, tmp_path / "out")))
    monkeypatch.setattr(shards.shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10**9, 10**9 - 500, 500))
    with pytest.raises(ShardError, match=r"needs \d+\.\d\d MB .* only 500 B is free"):
        blockwise.precompute(cfg)
    assert not list((tmp_path / "out").rglob("*.safetensors"))


def test_plan_405b_offline_and_other_sizes(capsys, tmp_path):
    assert main(["blockwise", "plan", str(REPO / "recipes" / "llama3_1_405b.yaml")]) == 0
    out = capsys.readouterr().out
    assert "126 layers" in out and "14 blocks" in out
    assert "× 50,000,000 tokens × 16384 hidden × 14 block starts = 22.94 TB" in out  # the paper's ≈22 TB
    assert main(["blockwise", "plan", str(REPO / "recipes" / "llama3_1_405b.yaml"), "blockwise.block_size=1"]) == 0
    assert "= 206.44 TB" in capsys.readouterr().out  # the paper's ≈200 TB
    assert main(["blockwise", "plan", str(REPO / "recipes" / "llama3_1_70b.yaml")]) == 0
    assert "80 layers" in (out := capsys.readouterr().out) and "16 blocks" in out and "= 13.11 TB" in out

    # a config the test writes: 10 layers, hidden 96, k = 4 -> 3 blocks; 1M tokens in bf16
    cfg = {"model_type": "llama", "hidden_size": 96, "intermediate_size": 192, "num_hidden_layers": 10,
           "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 1000}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    assert main(["blockwise", "plan", str(REPO / "recipes" / "llama3_1_405b.yaml"), "blockwise.block_size=4",
                 "--model-config", str(tmp_path / "config.json"), "--tokens", "1000000",
                 "--json", str(tmp_path / "plan.json")]) == 0
    out = capsys.readouterr().out
    need = 2 * 1_000_000 * 96 * 3
    assert f"= {need / 1e6:.2f} MB" in out and "3 blocks" in out
    plan = json.loads((tmp_path / "plan.json").read_text())
    assert plan["disk_bytes"] == need and [b["layers"] for b in plan["blocks"]] == [[0, 3], [4, 7], [8, 9]]
    layer_params = 4 * 96 * 24 * 2 + 2 * 96 * 24 * 2 + 3 * 96 * 192 + 2 * 96  # q,o + k,v + mlp + norms
    assert plan["blocks"][2]["base_params"] == 2 * layer_params



def _moe_layer_params(hidden: int, heads: int, kv_heads: int, inter: int, experts: int) -> int:
    """One Phi-3.5-MoE / GRIN-MoE decoder layer: q/k/v/o with biases, every expert's gate/up/down, the router,
    two LayerNorms (weight and bias)."""
    d = hidden // heads
    attention = 2 * (hidden * heads * d + heads * d) + 2 * (hidden * kv_heads * d + kv_heads * d)
    return attention + experts * 3 * hidden * inter + hidden * experts + 2 * 2 * hidden


def test_plan_counts_every_expert_as_resident(capsys, tmp_path):
    """A mixture-of-experts layer holds all its experts whatever the top-k: plan's base parameters are
    num_local_experts × expert MLP + router + attention + norms, as in the model itself built on the meta device."""
    import transformers

    cfg = {"model_type": "phimoe", "hidden_size": 64, "intermediate_size": 40, "num_hidden_layers": 6,
           "num_attention_heads": 4, "num_key_value_heads": 2, "num_local_experts": 5, "num_experts_per_tok": 2,
           "vocab_size": 100, "attention_bias": True, "lm_head_bias": True}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    assert main(["blockwise", "plan", str(REPO / "recipes" / "grin_moe.yaml"), "blockwise.block_size=4",
                 "--model-config", str(tmp_path / "config.json"), "--tokens", "1000",
                 "--json", str(tmp_path / "plan.json")]) == 0
    plan = json.loads((tmp_path / "plan.json").read_text())
    layer = _moe_layer_params(64, 4, 2, 40, 5)
    assert [b["base_params"] for b in plan["blocks"]] == [4 * layer, 2 * layer]
    with torch.device("meta"):
        model = transformers.PhimoeForCausalLM(transformers.PhimoeConfig(**cfg))
    assert sum(p.numel() for p in model.model.layers.parameters()) == 6 * layer
    assert plan["blocks"][0]["base_bytes"] == 2 * 4 * layer  # bf16

    # the shipped recipe: GRIN-MoE's own config, 41.87 B parameters, 1.30 B of them per layer
    assert main(["blockwise", "plan", str(REPO / "recipes" / "grin_moe.yaml"), "--json", str(tmp_path / "grin.json")]) == 0
    assert "32 layers" in (out := capsys.readouterr().out) and "8 blocks" in out and "= 3.28 TB" in out
    grin = json.loads((tmp_path / "grin.json").read_text())
    assert _moe_layer_params(4096, 32, 8, 6400, 16) == 1_300_326_400
    assert [b["base_params"] for b in grin["blocks"]] == [4 * 1_300_326_400] * 8

def test_stitch_merges_blocks_and_runs_stage2(assets, tmp_path):
    path = recipe(assets, tmp_path / "out", block_size=2)
    cfg = load_config(str(path), ["lora.max_steps=2", "lora.grad_accum=1", "report.enabled=true",
                                  "report.sample_tokens=2"])
    blockwise.precompute(cfg)
    blockwise.train(cfg, blocks=[0])
    with pytest.raises(blockwise.BlockwiseError, match=r"layers 2, 3 have no trained weights \(block\(s\) 1"):
        blockwise.stitch(cfg)
    blockwise.train(cfg, blocks=[1])
    # a stale block folder holding layers 0-1 again is refused, naming both
    stale = tmp_path / "out" / "blockwise" / "block-009"
    stale.mkdir()
    (stale / "result.json").write_text(json.dumps({"block": 9, "linearized": [0, 1]}))
    src = tmp_path / "out" / "blockwise" / "block-000" / "attention.safetensors"
    (stale / "attention.safetensors").write_bytes(src.read_bytes())
    with pytest.raises(blockwise.BlockwiseError, match="layer 0 is duplicated: both block-000 and block-009"):
        blockwise.stitch(cfg)
    import shutil

    shutil.rmtree(stale)
    # a block's weights changed on disk since training wrote them: refused, naming the file
    block1 = tmp_path / "out" / "blockwise" / "block-001" / "attention.safetensors"
    good = block1.read_bytes()
    block1.write_bytes(good[:-1] + bytes([good[-1] ^ 1]))
    with pytest.raises(ValueError, match=r"block-001/attention.safetensors has changed since lolcats wrote it"):
        blockwise.stitch(cfg)
    block1.write_bytes(good)
    result = blockwise.stitch(cfg)
    out = tmp_path / "out"
    assert {"attention.safetensors", "adapter", "report.md", "lolcats_config.json"} <= {p.name for p in out.iterdir()}
    merged, _ = merge_blocks(cfg)
    saved = load_file(str(out / "attention.safetensors"))
    assert all(torch.equal(saved[n], t) for n, t in merged.items())
    from lolcats.checkpoint import load

    model = load(out)
    x = torch.randint(3, 40, (1, 20))
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=x).logits, result.model(input_ids=x).logits, atol=0, rtol=0)


def test_a_block_loads_only_its_own_layers(assets, tmp_path):
    from lolcats.blockwise.common import streaming_model
    from lolcats.blockwise.train import _block_model

    cfg = load_config(str(recipe(assets, tmp_path / "out", block_size=2)))
    sm, _ = streaming_model(cfg)
    transfer = _block_model(cfg, sm, range(2, 4))
    assert [w.layer_idx for w in transfer.layers] == [2, 3] and transfer.total == 4
    for i, layer in enumerate(sm.layers):
        base = [p for n, p in layer.named_parameters() if "feature_map" not in n and "window_factor" not in n]
        assert all(p.is_meta != (i in (2, 3)) for p in base), i
    assert sm.model.get_input_embeddings().weight.is_meta and sm.model.lm_head.weight.is_meta
