"""Retrieval at constant memory on SmolLM2: neither, a sparse cache, N softmax layers, both — one table.

    .venv/bin/python scripts/bench_retrieval.py --linear OUT_DIR --softmax OUT_DIR_N [--sparse-cache 64]
        [--work bench_retrieval_work] [--json docs/retrieval.json]

``--linear`` is a finished demo run (no softmax layers); ``--softmax`` the same recipe with
``attention.softmax_layers: N`` (stage 1 is the same; only stage 2 differs). The sparse cache needs no
training: it is set at evaluation time (``--sparse-cache G``). For each configuration, and for the original
model, every figure comes from the project's own commands, each in its own process, cached in ``--work``
(rerun to resume):

* ``lolcats eval passkey`` (lengths 1,024 / 2,048 / 4,096 / 8,000, depths 0.1–0.9, 10 prompts per length) and
  ``--task multi-needle`` (12 prompts per length), with the cache bytes per sequence at each length;
* ``lolcats eval ppl --data lolcats:moby_dick --seq-len 8192 --windows 2``: perplexity by position;
* ``scripts/bench_generate.py --lengths 7680 --batches 1``: decode tokens/s at a 7,680-token prompt (an
  untrained conversion with the same attention options: timing does not depend on the weights).

Prints the table, writes JSON.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parents[1]
LOLCATS = str(HERE / ".venv/bin/lolcats")
ORIGINAL = "lolcats:smollm2-135m-instruct"
BUCKETS = ("0–512", "512–1k", "1k–2k", "2k–4k", "4k–8k")


def run(cmd: list[str], done: Path) -> None:
    """Run ``cmd`` unless ``done`` exists (its result)."""
    if done.exists():
        return
    print("running:", " ".join(cmd), file=sys.stderr)
    subprocess.run(cmd, check=True, cwd=HERE)


def measure(name: str, model: str, sparse: int | None, attention: list[str], work: Path) -> dict:
    d = work / name.replace(" ", "_")
    d.mkdir(parents=True, exist_ok=True)
    extra = [] if sparse is None else ["--sparse-cache", str(sparse)]
    run([LOLCATS, "eval", "passkey", model, "--out", str(d), *extra], d / "passkey.json")
    run([LOLCATS, "eval", "passkey", model, "--task", "multi-needle", "--out", str(d), *extra], d / "multi_needle.json")
    run([LOLCATS, "eval", "ppl", model, "--data", "lolcats:moby_dick", "--seq-len", "8192", "--windows", "2",
         "--out", str(d / "ppl.json"), *extra], d / "ppl.json")
    if attention is not None:
        run([sys.executable, str(HERE / "scripts/bench_generate.py"), "--lengths", "7680", "--batches", "1",
             "--new-tokens", "64", "--prefill-repeats", "1", "--out", str(d / "decode.json"), "--attention",
             *attention], d / "decode.json")
    out = {k: json.loads((d / f"{k}.json").read_text()) for k in ("passkey", "multi_needle", "ppl")}
    if (d / "decode.json").exists():
        out["decode"] = json.loads((d / "decode.json").read_text())
    return out


def attention_options(out_dir: str, sparse: int | None) -> list[str]:
    """``--attention`` options of bench_generate for the run's attention (+ the sparse cache)."""
    record = json.loads((Path(out_dir) / "lolcats_config.json").read_text())
    a = record["config"]["attention"]
    keep = ("variant", "window_size", "sink_tokens", "decay", "decay_init", "skip_layers")
    opts = [f"{k}={json.dumps(a[k])}" for k in keep if k in a]
    return opts + ([f"sparse_cache={sparse}"] if sparse else [])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--linear", required=True, help="a finished run without softmax layers")
    ap.add_argument("--softmax", required=True, help="the same recipe with attention.softmax_layers: N")
    ap.add_argument("--sparse-cache", type=int, default=64)
    ap.add_argument("--work", default="bench_retrieval_work")
    ap.add_argument("--json", default="docs/retrieval.json")
    args = ap.parse_args()
    work, g = Path(args.work), args.sparse_cache
    configs = {
        "original (softmax, full KV cache)": (ORIGINAL, None, None),
        "neither": (args.linear, None, attention_options(args.linear, None)),
        f"sparse cache G={g}": (args.linear, g, attention_options(args.linear, g)),
        "softmax layers": (args.softmax, None, attention_options(args.softmax, None)),
        f"both (G={g})": (args.softmax, g, attention_options(args.softmax, g)),
    }
    results = {name: measure(name, *spec, work) for name, spec in configs.items()}
    lengths = results["neither"]["passkey"]["lengths"]
    head = ("| configuration | " + " | ".join(f"passkey {n}" for n in lengths) + " | "
            + " | ".join(f"needles {n}" for n in lengths) + " | " + " | ".join(BUCKETS)
            + " | cache MiB at 8k | ÷ KV cache | decode tok/s at 7,680 |")
    lines = [head, "|---|" + "---:|" * (2 * len(lengths) + len(BUCKETS) + 3)]
    kv = results["original (softmax, full KV cache)"]["passkey"]["cache_bytes"]
    for name, r in results.items():
        pk, mn = r["passkey"]["by_length"], r["multi_needle"]["by_length"]
        cache = r["passkey"]["cache_bytes"]
        last = str(lengths[-1])
        decode = next((x["decode_tokens_per_s"] for x in r.get("decode", {}).get("results", [])
                       if x["model"] == "linearized"), None)
        cells = [f"{100 * pk[str(n)]:.0f}%" for n in lengths] + [f"{100 * mn[str(n)]:.0f}%" for n in lengths]
        cells += [f"{r['ppl']['by_position'][b]['ppl']:.1f}" for b in BUCKETS]
        cells += [f"{cache[last] / 2**20:.1f}", f"{cache[last] / kv[last]:.1%}",
                  "–" if decode is None else f"{decode:.1f}"]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    print("\n".join(lines))
    Path(args.json).write_text(json.dumps({"date": time.strftime("%Y-%m-%d"), "linear": args.linear,
                                           "softmax": args.softmax, "sparse_cache": g, "results": results}, indent=1))


if __name__ == "__main__":
    main()
