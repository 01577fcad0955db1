"""Full offline 5-shot MMLU (13,757 scored items) on SmolLM2, original and linearized, and the speed-up of
the cached+batched path over the uncached one on a subset, measured side by side in the same run.

    python scripts/bench_mmlu.py [--linearized OUT_DIR] [--json docs/bench_mmlu.json]

Without --linearized the linearized model is an untrained conversion (terraced, w = 64): fine for
timing, meaningless for accuracy; the output says which it was. Progress is kept per subject in
``--work`` (JSONL), so an interrupted run continues where it stopped; the total time is the sum of the
per-subject times.

It also counts the original's FLOPs (``--flops-only`` does nothing else): cached+batched against
uncached, over the full run and the subset. Their ratio is the speed-up the cached path would show if
it ran at the uncached path's FLOP rate.
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
from lolcats.base_model import cast_base, load_base
from lolcats.checkpoint import load_model_any
from lolcats.config import ModelConfig
from lolcats.eval.mmlu import SubjectPrompts, batch_plan, evaluate_mmlu, tokenize_subject
from lolcats.eval.mmlu_data import load_mmlu
from lolcats.report import machine

SUBSET = ("abstract_algebra", "college_biology", "high_school_us_history", "marketing")
# Items per subset subject. The cached path runs a subject's exemplars once for all its questions, so its
# speed-up grows with the questions that share them: with 70 the subset's cached/uncached FLOP ratio
# (5.87) is the full run's (5.88), where 40 (5.16) would share them among fewer questions than any whole
# subject has (the smallest has 95). The script prints both ratios.
SUBSET_LIMIT = 70


def full_runs(models: dict, tokenizer, data, batch_size: int, work: Path) -> dict[str, dict]:
    """Every subject, cached + batched, the models taking turns subject by subject (a drift in the machine's
    speed then hits them alike); per-subject records appended to ``work/<name>.jsonl`` as they finish."""
    done = {name: {} for name in models}
    for name in models:
        path = work / f"{name}.jsonl"
        if path.exists():
            for line in path.read_text().splitlines():
                rec = json.loads(line)
                done[name][rec["subject"]] = rec
    for i, subject in enumerate(data.subjects):
        for name, model in models.items():
            if subject in done[name]:
                continue
            r = evaluate_mmlu(model, tokenizer, data.select([subject]), shots=5, batch_size=batch_size)
            s = r["subjects"][subject]
            rec = {"subject": subject, "items": s["items"], "correct": s["correct"], "seconds": r["seconds"],
                   "tokens_run": r["tokens_run"]}
            with (work / f"{name}.jsonl").open("a") as f:
                f.write(json.dumps(rec) + "\n")
            done[name][subject] = rec
            print(f"  [{name}] {i + 1}/{len(data.subjects)} {subject}: {s['items']} items, "
                  f"{r['seconds']:.0f} s, acc {s['accuracy']:.3f}", flush=True)
    out = {}
    for name in models:
        recs = [done[name][s] for s in data.subjects]
        items = sum(r["items"] for r in recs)
        seconds = sum(r["seconds"] for r in recs)
        out[name] = {
            "items": items, "seconds": seconds, "minutes": seconds / 60, "items_per_s": items / seconds,
            "tokens_run": sum(r["tokens_run"] for r in recs),
            "micro_accuracy": sum(r["correct"] for r in recs) / items,
            "macro_accuracy": statistics.mean(r["correct"] / r["items"] for r in recs),
        }
    return out


def subset_speedup(model, tokenizer, data, batch_size: int, limit: int, repeats: int = 3) -> dict:
    """Cached+batched against uncached on SUBSET, subject by subject: the cached path runs ``repeats`` times
    around the one uncached run (once before, the rest after), and a subject's cached time is the median of
    its runs. One cached pass is short (~10 s a subject) next to the uncached one, so a burst of load on a
    shared machine would otherwise swing the ratio; the uncached run is long enough to average over it."""
    fast_pred, slow_pred, cached_runs, uncached = [], [], {}, {}
    for subject in SUBSET:
        sub = data.select([subject], limit)
        first = evaluate_mmlu(model, tokenizer, sub, shots=5, batch_size=batch_size, cached=True)
        slow = evaluate_mmlu(model, tokenizer, sub, shots=5, batch_size=1, cached=False)
        cached_runs[subject] = [first["seconds"]] + [
            evaluate_mmlu(model, tokenizer, sub, shots=5, batch_size=batch_size, cached=True)["seconds"]
            for _ in range(repeats - 1)]
        uncached[subject] = slow["seconds"]
        fast_pred += first["predictions"]
        slow_pred += slow["predictions"]
    lp_f = torch.tensor([p["logprobs"] for p in fast_pred])
    lp_s = torch.tensor([p["logprobs"] for p in slow_pred])
    same = sum(a["prediction"] == b["prediction"] for a, b in zip(fast_pred, slow_pred, strict=True))
    worst = int((lp_f - lp_s).abs().amax(-1).argmax())
    item = fast_pred[worst]
    cached_s = sum(statistics.median(t) for t in cached_runs.values())
    uncached_s = sum(uncached.values())
    return {"subjects": list(SUBSET), "limit_per_subject": limit, "items": len(fast_pred),
            "worst_item": {"subject": item["subject"], "index": item["index"], "cached": lp_f[worst].tolist(),
                           "uncached": lp_s[worst].tolist()},
            "cached_repeats": repeats, "cached_runs_s": cached_runs, "uncached_runs_s": uncached,
            "cached_s": cached_s, "uncached_s": uncached_s, "speedup": uncached_s / cached_s,
            "speedup_range": [uncached_s / sum(max(t) for t in cached_runs.values()),
                              uncached_s / sum(min(t) for t in cached_runs.values())],
            "same_predictions": same, "max_logprob_diff": float((lp_f - lp_s).abs().max())}


def _causal(n: int) -> int:
    return n * (n + 1) // 2


def work(prompts: SubjectPrompts, batch_size: int) -> dict[str, dict[str, int]]:
    """What one subject costs the original (softmax) model, ``uncached`` (every prompt alone) and ``cached``
    (as :func:`lolcats.eval.mmlu.batch_plan` lays it out: the exemplars once, each shared question stem
    once, then right-padded batches of questions sorted by length): ``tokens`` through the decoder (padding
    included), attended (query, key) ``pairs`` per layer and query head, ``rows`` of logits, and
    ``mlp_skipped``, the tokens whose last-layer MLP a cached batch does not run (it runs on one token per
    row)."""
    p, rests = len(prompts.shared), prompts.rests
    uncached = {"tokens": sum(p + len(r) for r in rests), "pairs": sum(_causal(p + len(r)) for r in rests),
                "rows": len(rests), "mlp_skipped": 0}
    cached = {"tokens": p, "pairs": _causal(p), "rows": 1, "mlp_skipped": 0}
    for stem, batches in batch_plan(rests, batch_size):
        if stem:  # a shared stem runs once on top of the exemplars; its questions then read both
            cached["tokens"] += stem
            cached["pairs"] += stem * p + _causal(stem)
            cached["rows"] += 1
        for idx in batches:
            rows, width = len(idx), max(len(rests[i]) - stem for i in idx)
            cached["tokens"] += rows * width
            cached["pairs"] += rows * (width * (p + stem) + _causal(width))
            cached["rows"] += rows
            cached["mlp_skipped"] += rows * (width - 1)
    return {"uncached": uncached, "cached": cached}


def flop_count(model, tokenizer, data, batch_size: int) -> dict:
    """Multiply-add FLOPs the original (softmax) model needs for ``data``, cached+batched and uncached (see
    :func:`work`): 2 per weight of the decoder's linear maps per token, 4 · H · D per (query, key) pair per
    layer for attention, 2 · V · hidden per row of logits, less the last layer's MLP on the tokens a cached
    batch skips. Nothing else counted."""
    head = model.get_output_embeddings()

    def linear_weights(module: torch.nn.Module) -> int:
        return sum(m.weight.numel() for m in module.modules() if isinstance(m, torch.nn.Linear) and m is not head)

    cfg = model.config
    cost = {"tokens": 2 * linear_weights(model), "rows": 2 * head.weight.numel(),
            "pairs": 4 * cfg.num_attention_heads * cfg.head_dim * cfg.num_hidden_layers,
            "mlp_skipped": -2 * linear_weights(model.get_decoder().layers[-1].mlp)}
    total = {"cached": 0.0, "uncached": 0.0}
    for subject in data.subjects:
        prompts = tokenize_subject(tokenizer, subject, data.dev[subject][:5], data.test[subject])
        for path, counts in work(prompts, batch_size).items():
            total[path] += sum(cost[k] * n for k, n in counts.items())
    return {"cached_tflop": total["cached"] / 1e12, "uncached_tflop": total["uncached"] / 1e12,
            "ratio": total["uncached"] / total["cached"]}


def matmul_rate(threads: int) -> float:
    """GFLOP/s of one fp32 matmul of MLP shape (1600 × 576 by 576 × 1536) on this machine, median of 30."""
    torch.set_num_threads(threads)
    x, w = torch.randn(1600, 576), torch.randn(1536, 576)
    times = []
    for _ in range(33):
        t = time.perf_counter()
        torch.nn.functional.linear(x, w)
        times.append(time.perf_counter() - t)
    return 2 * 1600 * 576 * 1536 / statistics.median(times[3:]) / 1e9


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="lolcats:smollm2-135m-instruct")
    ap.add_argument("--linearized", help="a linearized out_dir of --model (default: untrained conversion)")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--subset-limit", type=int, default=SUBSET_LIMIT, help="items per subject in the speed-up subset")
    ap.add_argument("--subset-repeats", type=int, default=3,
                    help="cached runs per subset subject around its one uncached run (the median is taken)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                    help="base weights: bfloat16 pays off only on CPUs with AMX / AVX512-BF16 (on one without, a bf16 "
                         "matmul measured 4.8x slower than fp32); attention of linearized layers computes in float32")
    ap.add_argument("--only", choices=["original", "linearized"], help="run one model")
    ap.add_argument("--skip-full", action="store_true", help="only the subset speed-up")
    ap.add_argument("--flops-only", action="store_true",
                    help="only count the original's FLOPs (full run and subset, cached and uncached) and time a "
                         "matmul; leaves the timings in --json as they are")
    ap.add_argument("--work", default="bench_mmlu_work", help="folder for per-subject progress (resumable)")
    ap.add_argument("--json", default="docs/bench_mmlu.json")
    args = ap.parse_args()
    if args.subset_repeats < 1:
        ap.error(f"--subset-repeats must be at least 1, got {args.subset_repeats}")
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
    if not args.flops_only:  # the meta data describe the timings
        report["meta"] = {"model": args.model, "linearized": lin_desc, "data": data.source,
                          "exemplar_rule": data.exemplar_rule, "batch_size": args.batch_size, "dtype": args.dtype,
                          "machine": machine(args.threads), "torch": torch.__version__,
                          "date": time.strftime("%Y-%m-%d")}
    flops = {"full": flop_count(original, tokenizer, data, args.batch_size),
             "subset": flop_count(original, tokenizer, data.select(SUBSET, args.subset_limit), args.batch_size),
             "matmul_gflops": matmul_rate(args.threads), "machine": machine(args.threads),
             "date": time.strftime("%Y-%m-%d")}
    report["flops_original"] = flops
    models = {name: model for name, model in (("original", original), ("linearized", linearized))
              if not args.flops_only and args.only in (None, name)}
    for name, model in models.items():
        print(f"{name}: subset speed-up ({len(SUBSET)} subjects x {args.subset_limit} items)", flush=True)
        report.setdefault(name, {})["subset"] = subset_speedup(model, tokenizer, data, args.batch_size,
                                                               args.subset_limit, args.subset_repeats)
        out_path.parent.mkdir(parents=True, exist_ok=True)
        out_path.write_text(json.dumps(report, indent=1))
    if models and not args.skip_full:
        print(f"full 5-shot MMLU: {', '.join(models)}, subject by subject", flush=True)
        for name, full in full_runs(models, tokenizer, data, args.batch_size, work).items():
            report[name]["full"] = full
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
        spread = "–".join(f"{x:.2f}" for x in s.get("speedup_range", ()))
        print(f"| {name} | {full} | {s['speedup']:.2f}× ({s['uncached_s']:.0f} s / {s['cached_s']:.0f} s; "
              f"slowest–fastest cached runs {spread or '–'}) | "
              f"{s['same_predictions']}/{s['items']} | {s['max_logprob_diff']:.1e} |")
    full, sub, rate = flops["full"], flops["subset"], flops["matmul_gflops"]
    print(f"\nFLOPs of the original (cached+batched / uncached): full run {full['cached_tflop']:.0f} / "
          f"{full['uncached_tflop']:.0f} TFLOP (ratio {full['ratio']:.2f}), subset {sub['cached_tflop']:.1f} / "
          f"{sub['uncached_tflop']:.1f} TFLOP (ratio {sub['ratio']:.2f}: the subset speed-up at equal FLOP rates)")
    line = f"one MLP-shaped fp32 matmul alone: {rate:.0f} GFLOP/s on this machine now"
    e = report.get("original", {}).get("full")
    if e:
        line += f"; the original's full run did {full['cached_tflop']:.0f} TFLOP in {e['minutes']:.1f} min = " \
                f"{full['cached_tflop'] * 1e3 / e['seconds']:.0f} GFLOP/s"
    print(line)
    out_path.write_text(json.dumps(report, indent=1))
    print(f"JSON written to {out_path}")


if __name__ == "__main__":
    main()
