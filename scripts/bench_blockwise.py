"""Blockwise against joint stage 1 on SmolLM2 (same tokens), and the peak memory of `precompute`.

    python scripts/bench_blockwise.py [--recipe recipes/smollm2_135m_blockwise.yaml] [--work runs/bench_blockwise]

Runs, each in its own process so its peak RSS is its own (os.wait4): the Python runtime alone; the full
model loaded with one forward pass (what a non-streaming teacher pass holds); `lolcats blockwise
precompute`; `lolcats blockwise train`; and joint stage 1 (`lolcats linearize` with stage 2 and the report
off). Then both results are scored by the same function on the same held-out chunks (mean over layers of
the per-layer attention MSE, teacher-forced). Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

RUNTIME = "import torch, transformers, lolcats.cli"
FULL_MODEL = """
import torch, transformers, lolcats.cli
from lolcats.sources import resolve_model
m = transformers.AutoModelForCausalLM.from_pretrained(resolve_model('lolcats:smollm2-135m-instruct'))
with torch.no_grad():
    m.model(input_ids=torch.randint(0, 1000, (1, 1024)))
"""


def run(name: str, cmd: list[str]) -> dict:
    """Run ``cmd``; its wall time, exit status and peak RSS (MiB) from the kernel's own accounting."""
    print(f"== {name}: {' '.join(cmd)[:160]}", flush=True)
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        sys.exit(f"{name} failed ({proc.returncode}):\n{out[-3000:]}")
    print(out[-1500:], flush=True)
    return {"seconds": seconds, "peak_rss_mib": usage.ru_maxrss / 1024, "output_tail": out[-1500:]}


def heldout_mse(recipe: str, overrides: list[str], attention_files: dict[str, Path]) -> dict[str, dict]:
    """Mean and per-layer held-out attention MSE of each attention file, plus the untrained conversion."""
    from lolcats.base_model import load_base
    from lolcats.checkpoint import load_attention
    from lolcats.config import load_config
    from lolcats.convert import convert_model
    from lolcats.data import build_train_data
    from lolcats.distill import heldout_attention_mse

    cfg = load_config(recipe, overrides)
    model, tokenizer, _ = load_base(cfg.model)
    d = cfg.data
    _, heldout = build_train_data(d.train, tokenizer, d.seq_len, d.heldout_chunks, before=d.train_filter,
                                  max_train_chunks=d.max_train_chunks)
    convert_model(model, cfg.attention, seed=cfg.seed)
    out = {}
    for name, path in {"untrained": None, **attention_files}.items():
        if path is not None:
            load_attention(model, path)
        per_layer = heldout_attention_mse(model, heldout)
        out[name] = {"mean": sum(per_layer) / len(per_layer), "per_layer": per_layer}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", default="recipes/smollm2_135m_blockwise.yaml")
    ap.add_argument("--work", default="runs/bench_blockwise")
    ap.add_argument("--json", default="docs/bench_blockwise.json")
    args = ap.parse_args()
    work = Path(args.work)
    py, cli = sys.executable, [sys.executable, "-m", "lolcats.cli"]
    bw = [f"out_dir={work / 'blockwise'}"]
    joint = [f"out_dir={work / 'joint'}", "lora.max_steps=0", "report.enabled=false"]
    steps = {
        "runtime only": run("runtime", [py, "-c", RUNTIME]),
        "full model + one forward": run("full model", [py, "-c", FULL_MODEL]),
        "blockwise precompute": run("precompute", [*cli, "blockwise", "precompute", args.recipe, *bw]),
        "blockwise train (3 blocks, one process)": run("train", [*cli, "blockwise", "train", args.recipe, *bw]),
        "joint stage 1": run("joint", [*cli, "linearize", args.recipe, *joint]),
    }
    from lolcats.blockwise.stitch import merge_blocks
    from lolcats.config import load_config
    from lolcats.io import atomic_save_safetensors

    merged, results = merge_blocks(load_config(args.recipe, bw))
    atomic_save_safetensors(merged, work / "blockwise_attention.safetensors")
    mse = heldout_mse(args.recipe, bw, {"joint": work / "joint" / "attention.safetensors",
                                        "blockwise": work / "blockwise_attention.safetensors"})
    manifest = json.loads((work / "blockwise" / "blockwise" / "hidden" / "manifest.json").read_text())
    report = {
        "date": time.strftime("%Y-%m-%d"), "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "torch": torch.__version__, "recipe": args.recipe, "steps": steps, "heldout_mse": mse,
        "blockwise_vs_joint": mse["blockwise"]["mean"] / mse["joint"]["mean"],
        "hidden_state_bytes": sum(e["bytes"] for e in manifest["shards"].values()),
        "block_results": results,
    }
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(report, indent=1))
    print("\n| step | wall time | peak RSS |\n|---|---:|---:|")
    for name, s in steps.items():
        print(f"| {name} | {s['seconds']:.0f} s | {s['peak_rss_mib']:.0f} MiB |")
    print("\n| stage 1 | held-out attention MSE (mean over layers) | vs joint |\n|---|---:|---:|")
    for name in ("untrained", "joint", "blockwise"):
        print(f"| {name} | {mse[name]['mean']:.5f} | {mse[name]['mean'] / mse['joint']['mean']:.3f} |")
    print(f"\nstored hidden states: {report['hidden_state_bytes'] / 1e6:.1f} MB; JSON written to {args.json}")


if __name__ == "__main__":
    main()
