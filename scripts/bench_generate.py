"""Decode and prefill throughput and memory: linearized SmolLM2 against the original (sdpa + DynamicCache).

    .venv/bin/python scripts/bench_generate.py [--lengths 512 2048 7680] [--batches 1 8] [--new-tokens 256]
        [--attention sink_tokens=4 decay=true]

Prefill is timed first, both models in one subprocess, alternating original / linearized at batch 1
(``--prefill-repeats`` each, median: prefill tokens/s and the prefill speed-up). Then each (model,
prompt length, batch) runs in a fresh subprocess so its memory figures are its own: the prompt is
prefilled once at batch 1 and the cache repeated to the batch size; then ``new-tokens`` greedy decode
steps are timed one by one (decode tokens/s = batch ÷ median step time). Resident memory is read
after glibc's malloc_trim, i.e. live memory. The linearized model is an *untrained* conversion
(terraced, w = 64, plus any ``--attention`` options): timing does not depend on its weights. Prints a table,
writes JSON and a PNG plot.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import psutil
import torch

from lolcats.io import release_freed_memory
from lolcats.report import machine


def rss_mb() -> float:
    """Resident memory after handing freed heap pages back to the OS, so the figure is live memory, not the
    allocator's cache of the prefill peak."""
    release_freed_memory()
    return psutil.Process().memory_info().rss / 2**20


def peak_rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def attention_config(options: list[str]):
    """The linearized model's attention: terraced, w = 64, plus ``key=value`` options (YAML values)."""
    import yaml

    from lolcats import AttentionConfig

    extra = {}
    for item in options:
        key, sep, value = item.partition("=")
        if not sep:
            sys.exit(f"--attention {item!r}: give key=value, e.g. sink_tokens=4")
        extra[key] = yaml.safe_load(value)
    return AttentionConfig(**{"variant": "terraced", "window_size": 64, **extra})


def worker(kind: str, length: int, batch: int, new_tokens: int, model_ref: str, threads: int,
           prefill_repeats: int = 3, options: list[str] = ()) -> dict:
    from transformers import DynamicCache

    from lolcats import convert_model
    from lolcats.attention import cache_nbytes
    from lolcats.base_model import load_base
    from lolcats.config import ModelConfig
    from lolcats.data import build_eval_windows

    torch.set_num_threads(threads)
    model, tokenizer, _ = load_base(ModelConfig(name_or_path=model_ref, device="cpu"))
    if kind == "linearized":
        torch.manual_seed(0)
        convert_model(model, attention_config(options))
    ids = build_eval_windows("lolcats:sotu", tokenizer, length, 1).input_ids  # (1, length) real text
    rss_before = rss_mb()
    with torch.no_grad():
        prefill = []
        for _ in range(prefill_repeats):
            cache = DynamicCache()
            t = time.perf_counter()
            out = model(ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
            prefill.append(time.perf_counter() - t)
        prefill_s = statistics.median(prefill)
        if batch > 1:
            cache.batch_repeat_interleave(batch)
        token = out.logits[:, -1].argmax(-1, keepdim=True).repeat(batch, 1)
        rss_prefilled = rss_mb()
        steps = []
        for _ in range(new_tokens):
            t = time.perf_counter()
            out = model(token, past_key_values=cache, use_cache=True)
            token = out.logits[:, -1].argmax(-1, keepdim=True)
            steps.append(time.perf_counter() - t)
            if len(steps) == 16:
                rss_early = rss_mb()
    return {
        "model": kind, "prompt_tokens": length, "batch": batch, "new_tokens": new_tokens,
        "prefill_tokens_per_s": length / prefill_s, "prefill_seconds": prefill,
        "decode_tokens_per_s": batch / statistics.median(steps),
        "cache_bytes_per_sequence": cache_nbytes(cache) / batch,
        "rss_before_prefill_mb": rss_before, "rss_after_prefill_mb": rss_prefilled,
        "rss_after_16_steps_mb": rss_early, "rss_after_decode_mb": rss_mb(),
        "peak_rss_mb": peak_rss_mb(),
    }


def prefill_worker(lengths: list[int], model_ref: str, threads: int, repeats: int, options: list[str] = ()) -> dict:
    """Prefill seconds of both models in one process, alternating original / linearized at every repeat,
    so machine noise hits both alike. Returns {length: {"original": [s, ...], "linearized": [s, ...]}}."""
    import copy

    from transformers import DynamicCache

    from lolcats import convert_model
    from lolcats.base_model import load_base
    from lolcats.config import ModelConfig
    from lolcats.data import build_eval_windows

    torch.set_num_threads(threads)
    original, tokenizer, _ = load_base(ModelConfig(name_or_path=model_ref, device="cpu"))
    linearized = copy.deepcopy(original)
    torch.manual_seed(0)
    convert_model(linearized, attention_config(options))
    out = {}
    with torch.no_grad():
        for length in lengths:
            ids = build_eval_windows("lolcats:sotu", tokenizer, length, 1).input_ids
            times = {"original": [], "linearized": []}
            for _ in range(repeats):
                for kind, model in (("original", original), ("linearized", linearized)):
                    t = time.perf_counter()
                    model(ids, past_key_values=DynamicCache(), use_cache=True, logits_to_keep=1)
                    times[kind].append(time.perf_counter() - t)
            out[str(length)] = times
    return out


def plot(results: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    for kind, style in (("original", "s--"), ("linearized", "o-")):
        for batch in sorted({r["batch"] for r in results}):
            rows = sorted((r for r in results if r["model"] == kind and r["batch"] == batch),
                          key=lambda r: r["prompt_tokens"])
            x = [r["prompt_tokens"] for r in rows]
            a.plot(x, [r["decode_tokens_per_s"] for r in rows], style, label=f"{kind}, batch {batch}")
            if batch == 1:
                b.plot(x, [r["cache_bytes_per_sequence"] / 2**20 for r in rows], style, label=kind)
    a.set(xlabel="prompt tokens", ylabel="decode tokens/s", title="Decode throughput", xscale="log")
    b.set(xlabel="prompt tokens", ylabel="cache MiB per sequence", title="Cache memory", xscale="log",
          yscale="log")
    for ax in (a, b):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="lolcats:smollm2-135m-instruct")
    ap.add_argument("--lengths", type=int, nargs="+", default=[512, 2048, 7680])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prefill-repeats", type=int, default=5, help="prefill timed this many times (median)")
    ap.add_argument("--attention", nargs="*", default=[], metavar="KEY=VALUE",
                    help="options of the linearized model's attention, e.g. sink_tokens=4 decay=true")
    ap.add_argument("--out", default="bench_generate.json")
    ap.add_argument("--worker", nargs=3, help=argparse.SUPPRESS)
    ap.add_argument("--prefill-worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.prefill_worker:
        print(json.dumps(prefill_worker(args.lengths, args.model, args.threads, args.prefill_repeats, args.attention)))
        return
    if args.worker:
        kind, length, batch = args.worker
        print(json.dumps(worker(kind, int(length), int(batch), args.new_tokens, args.model, args.threads,
                                args.prefill_repeats, args.attention)))
        return

    cmd = [sys.executable, __file__, "--model", args.model, "--threads", str(args.threads), "--prefill-repeats",
           str(args.prefill_repeats), "--lengths", *map(str, args.lengths), "--prefill-worker", "--attention", *args.attention]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ})
    if proc.returncode != 0:
        sys.exit(f"prefill worker failed:\n{proc.stderr[-2000:]}")
    prefill = json.loads(proc.stdout.strip().splitlines()[-1])
    print("prefill timed side by side: done", file=sys.stderr)

    results = []
    for length in args.lengths:
        for batch in args.batches:
            for kind in ("original", "linearized"):
                cmd = [sys.executable, __file__, "--model", args.model, "--new-tokens", str(args.new_tokens),
                       "--threads", str(args.threads), "--prefill-repeats", "1",
                       "--worker", kind, str(length), str(batch), "--attention", *args.attention]
                proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ})
                if proc.returncode != 0:
                    sys.exit(f"worker {kind} {length} {batch} failed:\n{proc.stderr[-2000:]}")
                results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
                r = results[-1]
                print(f"done: {kind:>10} prompt {length:>5} batch {batch}: decode {r['decode_tokens_per_s']:.1f} tok/s",
                      file=sys.stderr)

    print("| model | prompt | batch | prefill tok/s | decode tok/s | cache MiB/seq | RSS after decode MiB | peak RSS MiB |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in results:
        print(f"| {r['model']} | {r['prompt_tokens']} | {r['batch']} | {r['prefill_tokens_per_s']:.0f} | "
              f"{r['decode_tokens_per_s']:.1f} | {r['cache_bytes_per_sequence'] / 2**20:.2f} | "
              f"{r['rss_after_decode_mb']:.0f} | {r['peak_rss_mb']:.0f} |")
    print()
    print("| prompt | original prefill tok/s | linearized prefill tok/s | prefill speed-up |")
    print("|---:|---:|---:|---:|")
    prefill_rows = []
    for length in args.lengths:
        o = length / statistics.median(prefill[str(length)]["original"])
        lin = length / statistics.median(prefill[str(length)]["linearized"])
        prefill_rows.append({"prompt_tokens": length, "original_tokens_per_s": o, "linearized_tokens_per_s": lin,
                             "speedup": lin / o, "seconds": prefill[str(length)]})
        print(f"| {length} | {o:.0f} | {lin:.0f} | {lin / o:.2f}× |")
    print()
    print("| prompt | batch | decode speed-up | cache memory ratio |")
    print("|---:|---:|---:|---:|")
    ratios = []
    for length in args.lengths:
        for batch in args.batches:
            o = next(r for r in results if r["model"] == "original" and r["prompt_tokens"] == length and r["batch"] == batch)
            lin = next(r for r in results if r["model"] == "linearized" and r["prompt_tokens"] == length and r["batch"] == batch)
            row = {"prompt_tokens": length, "batch": batch,
                   "decode_speedup": lin["decode_tokens_per_s"] / o["decode_tokens_per_s"],
                   "cache_ratio": o["cache_bytes_per_sequence"] / lin["cache_bytes_per_sequence"]}
            ratios.append(row)
            print(f"| {length} | {batch} | {row['decode_speedup']:.2f}× | {row['cache_ratio']:.1f}× |")
    meta = {"model": args.model, "attention": args.attention,
            "linearized": "untrained conversion (terraced, w=64) — timing only",
            "machine": machine(args.threads), "torch": torch.__version__,
            "date": time.strftime("%Y-%m-%d")}
    with open(args.out, "w") as f:
        json.dump({"meta": meta, "prefill": prefill_rows, "results": results, "ratios": ratios}, f, indent=2)
    png = os.path.splitext(args.out)[0] + ".png"
    plot(results, png)
    print(f"wrote {args.out} and {png}")


if __name__ == "__main__":
    main()
