"""How much exact memory a linearized model needs to retrieve: passkey accuracy by prompt length for a grid
of sparse-cache sizes G and sink counts s, at inference time, no training (a diagnostic, not a recipe).

    .venv/bin/python scripts/sweep_exact_memory.py OUT_DIR --lengths 2048 --sparse-cache 0 256 512 1024 2048 \
        --sinks 4 64 [--trials 2] [--json sweep.json]

Each cell is ``lolcats.eval.passkey.passkey_accuracy`` on the prompts ``lolcats eval passkey --lengths
LENGTHS`` builds (the same keys and depths for the same list of lengths), with the linearized layers' G and s
replaced. G above 256 (the cap of ``attention.sparse_cache``) is allowed here so that a cache as long as the
prompt can be measured: every pair is then exact, which makes the model its own softmax version (the q/k/v/o
weights it was trained to, LoRA included), the upper bound of what any cache can give. s other than the trained
value is an inference-time change the model was not trained with. Prints a table (accuracy, cache bytes per
sequence, ÷ the original's KV cache) and the answers; writes JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lolcats.checkpoint import load_model_any  # noqa: E402
from lolcats.cli_common import nonneg_int, positive_int  # noqa: E402
from lolcats.convert import linearized_layers  # noqa: E402
from lolcats.eval.passkey import passkey_accuracy  # noqa: E402


def set_exact_memory(model: torch.nn.Module, cache: int, sinks: int) -> int:
    """G = ``cache`` and s = ``sinks`` in every linearized layer (G unbounded); returns the layers changed."""
    layers = linearized_layers(model)
    for m in layers:
        m.attn_config = replace(m.attn_config, sparse_cache=min(cache, 256), sink_tokens=sinks)
        m.spec = replace(m.spec, sparse=cache, sinks=sinks)
    return len(layers)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model", help="a finished out_dir (linearized)")
    p.add_argument("--lengths", type=positive_int, nargs="+", default=[2048])
    p.add_argument("--sparse-cache", type=nonneg_int, nargs="+", default=[0, 256, 512, 1024, 2048])
    p.add_argument("--sinks", type=nonneg_int, nargs="+", default=[4])
    p.add_argument("--trials", type=positive_int, default=2, help="prompts per depth (5 depths)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="write the results here")
    args = p.parse_args()
    torch.set_num_threads(2)
    model, tokenizer = load_model_any(args.model)
    if not linearized_layers(model):
        p.error(f"{args.model} has no linearized layer; give a linearized out_dir")
    rows = []
    for sinks in args.sinks:
        for cache in args.sparse_cache:
            set_exact_memory(model, cache, sinks)
            t0 = time.perf_counter()
            r = passkey_accuracy(model, tokenizer, args.lengths, trials=args.trials, seed=args.seed)
            for length in args.lengths:
                n = str(length)
                rows.append({"length": length, "sparse_cache": cache, "sinks": sinks, "accuracy": r["by_length"][n],
                             "cache_bytes": r["cache_bytes"][n], "softmax_kv_bytes": r["softmax_kv_bytes"][n],
                             "answers": [(x["depth"], x["key"], x["answer"]) for x in r["runs"] if x["length"] == length]})
            print(f"G={cache} s={sinks}: {r['by_length']} in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    print(f"passkey by length, {args.trials} prompts per depth (5 depths), {args.model}")
    print("| length | G | sinks | passkey | cache bytes | ÷ original KV |")
    print("|---:|---:|---:|---:|---:|---:|")
    for row in rows:
        print(f"| {row['length']} | {row['sparse_cache']} | {row['sinks']} | {100 * row['accuracy']:.0f}% "
              f"| {row['cache_bytes']:,} | {100 * row['cache_bytes'] / row['softmax_kv_bytes']:.0f}% |")
    for row in rows:
        print(f"{row['length']} G={row['sparse_cache']} s={row['sinks']}:",
              " ".join(f"[{d:g}] {a.strip()!r}" for d, _, a in row["answers"]))
    if args.json:
        Path(args.json).write_text(json.dumps({"model": args.model, "lengths": args.lengths, "trials": args.trials,
                                               "seed": args.seed, "rows": rows}, indent=1))
        print(f"written to {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
