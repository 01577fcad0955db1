"""Where 5-shot MMLU's time goes on the original (softmax) model, cached+batched against uncached, by kind
of work: the decoder's matmuls, the fused attention kernel, everything else (torch.profiler, self CPU time).

    python scripts/profile_mmlu.py [--subjects …] [--limit 70] [--json docs/profile_mmlu.json]

Next to each kind's time it puts the work it scales with (:func:`bench_mmlu.work`): tokens for the
matmuls and the rest, attended (query, key) pairs for attention. When a kind's time ratio
(uncached / cached) follows its work ratio, the cached path runs that kind of work as fast as the
uncached one, and the speed-up is set by how the work divides between tokens and pairs. Defaults: the
subset of ``bench_mmlu.py``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from bench_mmlu import SUBSET, SUBSET_LIMIT, work
from torch.profiler import ProfilerActivity, profile

from lolcats.base_model import load_base
from lolcats.config import ModelConfig
from lolcats.eval.mmlu import evaluate_mmlu, tokenize_subject
from lolcats.eval.mmlu_data import load_mmlu
from lolcats.report import machine

KINDS = ("matmul", "attention", "other")


def kind(op: str) -> str:
    if op in ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm"):
        return "matmul"
    return "attention" if "scaled_dot_product" in op or "flash_attention" in op else "other"


def profiled(model, tokenizer, data, batch_size: int, cached: bool) -> dict[str, float]:
    """Seconds of one pass over ``data`` and its self CPU time by kind."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        r = evaluate_mmlu(model, tokenizer, data, shots=5, batch_size=batch_size, cached=cached)
    out = dict.fromkeys(KINDS, 0.0)
    for event in prof.key_averages():
        out[kind(event.key)] += event.self_cpu_time_total / 1e6
    return {"seconds": r["seconds"], **out}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="lolcats:smollm2-135m-instruct")
    ap.add_argument("--subjects", nargs="+", default=list(SUBSET))
    ap.add_argument("--limit", type=int, default=SUBSET_LIMIT, help="items per subject")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", default="docs/profile_mmlu.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    data = load_mmlu(None)
    try:
        data = data.select(args.subjects, args.limit)
    except ValueError as e:
        ap.error(str(e))
    model, tokenizer, _ = load_base(ModelConfig(name_or_path=args.model, device="cpu"))
    evaluate_mmlu(model, tokenizer, data.select(data.subjects[:1], 2), shots=5)  # warm-up
    paths = {path: dict.fromkeys(("seconds", *KINDS), 0.0) for path in ("uncached", "cached")}
    counts = {path: {"tokens": 0, "pairs": 0} for path in paths}
    for subject in data.subjects:
        sub = data.select([subject])
        prompts = tokenize_subject(tokenizer, subject, sub.dev[subject][:5], sub.test[subject])
        for path, n in work(prompts, args.batch_size).items():
            for key in counts[path]:
                counts[path][key] += n[key]
        for path in paths:
            cached = path == "cached"
            t = profiled(model, tokenizer, sub, args.batch_size if cached else 1, cached)
            for key, value in t.items():
                paths[path][key] += value
            print(f"  {subject} {path}: {t['seconds']:.1f} s", flush=True)
    ratio = {key: paths["uncached"][key] / paths["cached"][key] for key in ("seconds", *KINDS)}
    work_ratio = {key: counts["uncached"][key] / counts["cached"][key] for key in ("tokens", "pairs")}
    print(f"\n{', '.join(args.subjects)} x {args.limit} items, batch {args.batch_size}, {machine(args.threads)}")
    print("| path | seconds | matmul s | attention s | other s | tokens | attended pairs |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for path, t in paths.items():
        print(f"| {path} | {t['seconds']:.1f} | {t['matmul']:.1f} | {t['attention']:.1f} | {t['other']:.1f} | "
              f"{counts[path]['tokens']:,} | {counts[path]['pairs']:,} |")
    print(f"| uncached / cached | {ratio['seconds']:.2f}× | {ratio['matmul']:.2f}× | {ratio['attention']:.2f}× | "
          f"{ratio['other']:.2f}× | {work_ratio['tokens']:.2f}× | {work_ratio['pairs']:.2f}× |")
    for path, t in paths.items():
        print(f"{path}: attention {100 * t['attention'] / t['seconds']:.0f} % of the time")
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "model": args.model, "subjects": args.subjects, "limit_per_subject": args.limit,
        "batch_size": args.batch_size, "machine": machine(args.threads), "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d"), "seconds_by_kind": paths, "work": counts,
        "time_ratio": ratio, "work_ratio": work_ratio}, indent=1))
    print(f"written to {out}")


if __name__ == "__main__":
    main()
