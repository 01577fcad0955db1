"""Full offline 5-shot MMLU (13,757 scored items) on SmolLM2, original and linearized, and the speed-up of
the cached+batched path over the uncached one on a subset, measured side by side in the same run.

    python scripts/bench_mmlu.py [--linearized OUT_DIR] [--json docs/bench_mmlu.json]

Without --linearized the linearized model is an untrained conversion (terraced, w = 64): fine for
timing, meaningless for accuracy; the output says which it was. Progress is kept per subject in
``--work`` (JSONL), so an interrupted run continues where it stopped; the total time is the sum of the
per-subject times.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from pathlib import Path

import torch

from lolcats import AttentionConfig, convert_model
from lolcats.checkpoint import cast_base, load_base, load_model_any
from lolcats.config import ModelConfig
from lolcats.eval.mmlu import evaluate_mmlu
from lolcats.eval.mmlu_data import load_mmlu
from lolcats.report import machine

SUBSET = ("abstract_algebra", "college_biology", "high_school_us_history", "marketing")


def full_run(name: str, model, tokenizer, data, batch_size: int, work: Path) -> dict:
    """Every subject, cached + batched; per-subject records appended to ``work`` as they finish."""
    done = {}
    if work.exists():
        for line in work.read_text().splitlines():
            rec = json.loads(line)
            done[rec["subject"]] = rec
    with work.open("a") as f:
        for i, subject in enumerate(data.subjects):
            if subject in done:
                continue
            r = evaluate_mmlu(model, tokenizer, data.select([subject]), shots=5, batch_size=batch_size)
            s = r["subjects"][subject]
            rec = {"subject": subject, "items": s["items"], "correct": s["correct"], "seconds": r["seconds"],
                   "tokens_run": r["tokens_run"]}
            f.write(json.dumps(rec) + "\n")
            f.flush()
            done[subject] = rec
            print(f"  [{name}] {i + 1}/{len(data.subjects)} {subject}: {s['items']} items, "
                  f"{r['seconds']:.0f} s, acc {s['accuracy']:.3f}", flush=True)
    recs = [done[s] for s in data.subjects]
    items = sum(r["items"] for r in recs)
    seconds = sum(r["seconds"] for r in recs)
    return {
        "items": items, "seconds": seconds, "minutes": seconds / 60, "items_per_s": items / seconds,
        "tokens_run": sum(r["tokens_run"] for r in recs),
        "micro_accuracy": sum(r["correct"] for r in recs) / items,
        "macro_accuracy": statistics.mean(r["correct"] / r["items"] for r in recs),
    }


def subset_speedup(model, tokenizer, data, batch_size: int, limit: int) -> dict:
    sub = data.select(SUBSET, limit)
    fast = evaluate_mmlu(model, tokenizer, sub, shots=5, batch_size=batch_size, cached=True)
    slow = evaluate_mmlu(model, tokenizer, sub, shots=5, batch_size=1, cached=False)
    lp_f = torch.tensor([p["logprobs"] for p in fast["predictions"]])
    lp_s = torch.tensor([p["logprobs"] for p in slow["predictions"]])
    same = sum(a["prediction"] == b["prediction"] for a, b in zip(fast["predictions"], slow["predictions"],
                                                                    strict=True))
    return {"subjects": list(SUBSET), "limit_per_subject": limit, "items": fast["items"],
            "cached_s": fast["seconds"], "uncached_s": slow["seconds"], "speedup": slow["seconds"] / fast["seconds"],
            "same_predictions": same, "max_logprob_diff": float((lp_f - lp_s).abs().max())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="lolcats:smollm2-135m-instruct")
    ap.add_argument("--linearized", help="a linearized out_dir of --model (default: untrained conversion)")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--subset-limit", type=int, default=40, help="items per subject in the speed-up subset")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                    help="base weights: bfloat16 pays off only on CPUs with AMX / AVX512-BF16 (on one without, a bf16 "
                         "matmul measured 4.8x slower than fp32); attention of linearized layers computes in float32")
    ap.add_argument("--only", choices=["original", "linearized"], help="run one model")
    ap.add_argument("--skip-full", action="store_true", help="only the subset speed-up")
    ap.add_argument("--work", default="bench_mmlu_work", help="folder for per-subject progress (resumable)")
    ap.add_argument("--json", default="docs/bench_mmlu.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    data = load_mmlu(None)
    original, tokenizer, _ = load_base(ModelConfig(name_or_path=args.model, device="cpu"))
    if args.linearized:
        linearized, _ = load_model_any(args.linearized, device="cpu")
        lin_desc = f"trained out_dir {args.linearized}"
    else:
        linearized = copy.deepcopy(original)
        torch.manual_seed(0)
        convert_model(linearized, AttentionConfig(variant="terraced", window_size=64))
        lin_desc = "untrained conversion (terraced, w=64): timing only, accuracy meaningless"
    for m in (original, linearized):
        cast_base(m, args.dtype)
    work = Path(args.work) / args.dtype
    work.mkdir(parents=True, exist_ok=True)
    out_path = Path(args.json)
    report = json.loads(out_path.read_text()) if out_path.exists() else {}
    report["meta"] = {"model": args.model, "linearized": lin_desc, "data": data.source,
                      "exemplar_rule": data.exemplar_rule, "batch_size": args.batch_size, "dtype": args.dtype,
                      "machine": machine(args.threads),
                      "torch": torch.__version__,
                      "date": time.strftime("%Y-%m-%d")}
    for name, model in (("original", original), ("linearized", linearized)):
        if args.only and name != args.only:
            continue
        entry = report.setdefault(name, {})
        print(f"{name}: subset speed-up ({len(SUBSET)} subjects x {args.subset_limit} items)", flush=True)
        entry["subset"] = subset_speedup(model, tokenizer, data, args.batch_size, args.subset_limit)
        if not args.skip_full:
            print(f"{name}: full 5-shot MMLU", flush=True)
            entry["full"] = full_run(name, model, tokenizer, data, args.batch_size, work / f"{name}.jsonl")
        out_path.parent.mkdir(parents=True, exist_ok=True)
        out_path.write_text(json.dumps(report, indent=1))
    print(f"\nlinearized model: {lin_desc}")
    print("| model | items | minutes | items/s | micro acc | macro acc | subset speed-up (cached vs uncached) | "
          "same predictions | max |Δ log p| |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name in ("original", "linearized"):
        e = report.get(name)
        if not e:
            continue
        f, s = e.get("full"), e["subset"]
        full = (f"{f['items']} | {f['minutes']:.1f} | {f['items_per_s']:.2f} | {100 * f['micro_accuracy']:.2f} | "
                f"{100 * f['macro_accuracy']:.2f}") if f else "– | – | – | – | –"
        print(f"| {name} | {full} | {s['speedup']:.2f}× ({s['uncached_s']:.0f} s / {s['cached_s']:.0f} s) | "
              f"{s['same_predictions']}/{s['items']} | {s['max_logprob_diff']:.1e} |")
    print(f"JSON written to {out_path}")


if __name__ == "__main__":
    main()
