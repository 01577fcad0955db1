"""Retrieval at constant memory on SmolLM2: neither, a sparse cache, N softmax layers, both — one table.

    .venv/bin/python scripts/bench_retrieval.py --linear OUT_DIR [--softmax OUT_DIR_N] [--sparse-cache 64 256]
        [--work bench_retrieval_work] [--json docs/retrieval.json]

``--linear`` is a finished run without softmax layers; ``--softmax`` (optional) the same recipe with
``attention.softmax_layers: N`` (stage 1 is the same; only stage 2 differs). The sparse cache needs no
training: it is set at evaluation time, one row per ``--sparse-cache G`` (and one "both" row per G with
``--softmax``). For each configuration, and for the original
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
LENGTHS = (1024, 2048, 4096, 8000)  # eval passkey's default lengths for SmolLM2
TABLE_ONLY = False  # --table-only: the table from what --work holds, "–" for what was not measured


def run(cmd: list[str], done: Path) -> None:
    """Run ``cmd`` unless ``done`` exists (its result), or, with ``--table-only``, say it was not run."""
    if done.exists():
        return
    if TABLE_ONLY:
        print("not run:", " ".join(cmd), file=sys.stderr)
        return
    print("running:", " ".join(cmd), file=sys.stderr)
    subprocess.run(cmd, check=True, cwd=HERE)


def measure(name: str, model: str, flags: list[str], attention: list[str] | None, work: Path) -> dict:
    """Every figure of one configuration: ``model`` evaluated with the eval ``flags`` (``--sparse-cache``,
    ``--softmax-layers``); decode speed with bench_generate's ``--attention`` options (None: not timed)."""
    d = work / name.replace(" ", "_")
    d.mkdir(parents=True, exist_ok=True)
    run([LOLCATS, "eval", "passkey", model, "--out", str(d), *flags], d / "passkey.json")
    run([LOLCATS, "eval", "passkey", model, "--task", "multi-needle", "--out", str(d), *flags], d / "multi_needle.json")
    run([LOLCATS, "eval", "ppl", model, "--data", "lolcats:moby_dick", "--seq-len", "8192", "--windows", "2",
         "--out", str(d / "ppl.json"), *flags], d / "ppl.json")
    if attention is not None:
        run([sys.executable, str(HERE / "scripts/bench_generate.py"), "--lengths", "7680", "--batches", "1",
             "--new-tokens", "64", "--prefill-repeats", "1", "--out", str(d / "decode.json"), "--attention",
             *attention], d / "decode.json")
    return {k: json.loads((d / f"{k}.json").read_text()) for k in ("passkey", "multi_needle", "ppl", "decode")
            if (d / f"{k}.json").exists()}


def attention_options(out_dir: str, sparse: int | None, softmax: list[int] = ()) -> list[str]:
    """``--attention`` options of bench_generate for the run's attention (+ the sparse cache, + layers run as
    softmax)."""
    record = json.loads((Path(out_dir) / "lolcats_config.json").read_text())
    a = record["config"]["attention"]
    keep = ("variant", "window_size", "sink_tokens", "decay", "decay_init")
    opts = [f"{k}={json.dumps(a[k])}" for k in keep if k in a]
    skip = sorted({*a.get("skip_layers", []), *softmax})  # chosen or by hand, the record's skip_layers
    return opts + ([f"skip_layers={json.dumps(skip)}"] if skip else []) + ([f"sparse_cache={sparse}"] if sparse else [])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--linear", required=True, help="a finished run without softmax layers")
    ap.add_argument("--softmax", help="the same recipe with attention.softmax_layers: N (rows left out without it)")
    ap.add_argument("--sparse-cache", type=int, nargs="+", default=[64], metavar="G")
    ap.add_argument("--restore-layers", type=int, nargs="+", default=[], metavar="L",
                    help="also: these layers of --linear run as softmax without retraining (eval --softmax-layers)")
    ap.add_argument("--table-only", action="store_true", help="run nothing: the table from what --work holds")
    ap.add_argument("--work", default="bench_retrieval_work")
    ap.add_argument("--json", default="docs/retrieval.json")
    args = ap.parse_args()
    global TABLE_ONLY
    TABLE_ONLY = args.table_only
    work = Path(args.work)
    configs = {"original (softmax, full KV cache)": (ORIGINAL, [], None),
               "neither": (args.linear, ["--sparse-cache", "0"], attention_options(args.linear, None))}  # a recorded cache off
    for g in args.sparse_cache:
        configs[f"sparse cache G={g}"] = (args.linear, ["--sparse-cache", str(g)], attention_options(args.linear, g))
    if args.restore_layers:
        ids = args.restore_layers
        configs[f"softmax layers {','.join(map(str, ids))} restored"] = (
            args.linear, ["--softmax-layers", *map(str, ids)], attention_options(args.linear, None, ids))
    if args.softmax:
        configs["softmax layers"] = (args.softmax, [], attention_options(args.softmax, None))
        for g in args.sparse_cache:
            configs[f"both (G={g})"] = (args.softmax, ["--sparse-cache", str(g)], attention_options(args.softmax, g))
    results = {name: measure(name, *spec, work) for name, spec in configs.items()}
    lengths = [str(n) for n in LENGTHS]
    head = ("| configuration | " + " | ".join(f"passkey {n}" for n in lengths) + " | "
            + " | ".join(f"needles {n}" for n in lengths) + " | " + " | ".join(BUCKETS)
            + " | cache MiB at 8k | ÷ KV cache, each length | decode tok/s at 7,680 |")
    lines = [head, "|---|" + "---:|" * (2 * len(lengths) + len(BUCKETS) + 3)]

    def pct(record: dict | None, n: str) -> str:
        return "–" if record is None or n not in record["by_length"] else f"{100 * record['by_length'][n]:.0f}%"

    for name, r in results.items():
        pk, mn, ppl = r.get("passkey"), r.get("multi_needle"), r.get("ppl")
        cells = [pct(pk, n) for n in lengths] + [pct(mn, n) for n in lengths]
        cells += [f"{ppl['by_position'][b]['ppl']:.1f}" if ppl else "–" for b in BUCKETS]
        cache = {**(mn or {}).get("cache_bytes", {}), **(pk or {}).get("cache_bytes", {})}
        kv = {**(mn or {}).get("softmax_kv_bytes", {}), **(pk or {}).get("softmax_kv_bytes", {})}
        decode = next((x["decode_tokens_per_s"] for x in r.get("decode", {}).get("results", [])
                       if x["model"] == "linearized"), None)
        cells += ["–" if lengths[-1] not in cache else f"{cache[lengths[-1]] / 2**20:.1f}",
                  " / ".join(f"{cache[n] / kv[n]:.0%}" if n in cache else "–" for n in lengths),
                  "–" if decode is None else f"{decode:.1f}"]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    print("\n".join(lines))
    record = {"date": time.strftime("%Y-%m-%d"), "linear": args.linear, "softmax": args.softmax,
              "sparse_cache": args.sparse_cache, "restore_layers": args.restore_layers, "results": results}
    Path(args.json).write_text(json.dumps(record, indent=1))


if __name__ == "__main__":
    main()
