"""Long-context ablation on SmolLM2: each option alone and combined, short- and long-context columns.

    .venv/bin/python scripts/ablate_long_context.py [--budget half|full] [--only NAME ...] [--work DIR]

Every configuration is the demo recipe (recipes/smollm2_135m.yaml) plus its options, trained by
``lolcats linearize`` in its own process (resumable: a finished run is reused), at 96 + 24 chunks (the
demo's budget until 2026-12-03) or half of it. Then, in one process per configuration:

* short context: perplexity over the demo report's 1,024-token windows (State of the Union from 2008,
  Moby-Dick from the start), as in the README's table;
* long context: perplexity by position over Moby-Dick windows 3–4 of 8,192 tokens (tokens 16,384–32,767),
  the data the defaults are chosen on (windows 1–2 are kept for judging them).

The original model and the untrained window-64 + 4-sinks baseline are measured once on the same windows.
A last table evaluates the sinks + offsets model with a decay set by hand (no training) for several λ₀: how
a starting decay changes long context before any training (how the demo's λ₀ was chosen). Prints the
tables, writes JSON.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parents[1]
BUCKETS = ("0–512", "512–1k", "1k–2k", "2k–4k", "4k–8k")
DECAY_ALONE = 0.999  # λ₀ of the decay-only configuration: λ^1024 ≈ 0.36, most of the training window kept
DECAY = 0.998  # λ₀ of the combined configurations, chosen from the hand-set table (windows 3–4)


def configs(budget: str) -> dict[str, list[str]]:
    """Recipe overrides per configuration; the token budget is 96 + 24 chunks of 1,024
    (the demo's until 2026-12-03; it trains 80 + 20 now) or half.
    The demo recipe now sets sinks, decay and position offsets itself: every configuration first turns all three
    off, then adds its own."""
    half = budget == "half"
    s1, s2 = (48, 12) if half else (96, 24)
    off = ["attention.sink_tokens=0", "attention.decay=false", "data.max_position_offset=0"]
    steps = off + [f"distill.max_steps={s1}", f"lora.max_steps={s2}", "distill.eval_every=16", "lora.eval_every=12"]
    long = off + [f"distill.max_steps={s1 // 2}", f"lora.max_steps={s2 // 2}", "data.seq_len=2048",
                  "distill.eval_every=8", "lora.eval_every=6", "data.heldout_chunks=2"]
    sinks, decay = ["attention.sink_tokens=4"], ["attention.decay=true", f"attention.decay_init={DECAY}"]
    offsets = ["data.max_position_offset=7168"]  # SmolLM2: 8,192 positions − 1,024
    offsets_long = ["data.max_position_offset=6144"]  # 8,192 − 2,048
    return {
        "none (the previous demo recipe)": steps,
        "sinks 4": steps + sinks,
        f"decay λ₀={DECAY_ALONE}": steps + ["attention.decay=true", f"attention.decay_init={DECAY_ALONE}"],
        "2,048-token chunks": long,
        "KL stage 2": steps + ["lora.loss=kl"],
        f"sinks + decay λ₀={DECAY}": steps + sinks + decay,
        "position offsets": steps + offsets,
        "sinks + offsets": steps + sinks + offsets,
        f"sinks + offsets + decay λ₀={DECAY} (the demo recipe)": steps + sinks + offsets + decay,
        f"sinks + offsets + decay λ₀={DECAY} + 2,048-token chunks": long + sinks + decay + offsets_long,
        f"all: sinks + offsets + decay λ₀={DECAY} + 2,048-token chunks + KL": long + sinks + decay + offsets_long
        + ["lora.loss=kl"],
    }


def slug(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name).strip("_")


def train(name: str, overrides: list[str], work: Path) -> float:
    out = work / slug(name)
    cmd = [str(HERE / ".venv/bin/lolcats"), "linearize", str(HERE / "recipes/smollm2_135m.yaml"), f"out_dir={out}",
           "report.enabled=false", *overrides]
    t0 = time.time()
    subprocess.run(cmd, check=True, cwd=HERE)
    return time.time() - t0


def evaluate(spec: str, window: int | None = None, sinks: int = 0, decay: float | None = None) -> dict:
    """Short- and long-context perplexities of one model (a softmax one optionally windowed)."""
    from lolcats.checkpoint import load_model_any
    from lolcats.convert import linearized_layers
    from lolcats.data import build_eval_windows
    from lolcats.eval.perplexity import perplexity, token_metrics

    torch.set_num_threads(2)
    model, tok = load_model_any(spec)
    if decay is not None:  # a hand-set starting decay on a model trained without one
        for layer in linearized_layers(model):
            layer.decay_logit = torch.nn.Parameter(torch.full((layer.num_heads,), math.log(decay / (1 - decay))))
    short = {"in_domain": build_eval_windows("lolcats:sotu", tok, 1024, 6, from_="2008"),
             "out_of_domain": build_eval_windows("lolcats:moby_dick", tok, 1024, 6)}
    result = {"short": {}, "seconds": {}}
    t0 = time.time()
    if decay is None:
        for key, chunks in short.items():
            if window is None:
                result["short"][key] = perplexity(model, chunks)
            else:
                result["short"][key] = math.exp(_nll(model, chunks, window, sinks))
    result["seconds"]["short"] = time.time() - t0
    t0 = time.time()
    long = build_eval_windows("lolcats:moby_dick", tok, 8192, 2, skip=2)
    r = token_metrics(model, long, window=window, sinks=sinks)
    result["long"] = {k: v["ppl"] for k, v in r["by_position"].items()}
    result["seconds"]["long"] = time.time() - t0
    return result


def _nll(model, chunks, window: int, sinks: int) -> float:
    from lolcats.eval.perplexity import window_nll

    total, count = window_nll(model, chunks, window, sinks=sinks)
    return total / max(count, 1)


def cached(path: Path, fn, *args, **kw) -> dict:
    if path.exists():
        return json.loads(path.read_text())
    r = fn(*args, **kw)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(r, indent=1))
    return r


def in_subprocess(path: Path, spec: str, **kw) -> dict:
    """Evaluate in a fresh process (its memory is its own), cached at ``path``."""
    if not path.exists():
        code = (f"import json, sys; sys.path.insert(0, {str(HERE / 'scripts')!r}); import ablate_long_context as a; "
                f"json.dump(a.evaluate({spec!r}, **{kw!r}), open({str(path)!r}, 'w'), indent=1)")
        path.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-c", code], check=True, cwd=HERE)
    return json.loads(path.read_text())


def row(name: str, r: dict, ref: dict | None = None) -> str:
    short = r.get("short", {})
    cells = [f"{short['in_domain']:.2f}" if short else "–", f"{short['out_of_domain']:.2f}" if short else "–"]
    cells += [f"{r['long'][b]:.1f}" for b in BUCKETS]
    if ref is not None:
        cells.append(f"{r['long']['4k–8k'] / ref['long']['4k–8k']:.2f}×")
    return f"| {name} | " + " | ".join(cells) + " |"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--budget", choices=["half", "full"], default="half")
    ap.add_argument("--only", nargs="*", help="configuration names (default: all)")
    ap.add_argument("--work", default="ablate_long_context_work", help="out_dirs and cached evaluations")
    ap.add_argument("--decays", type=float, nargs="*", default=[0.998, 0.999, 0.9995],
                    help="λ₀ values for the hand-set decay table")
    ap.add_argument("--json", default="docs/ablate_long_context.json")
    args = ap.parse_args()
    work = Path(args.work)
    base = "lolcats:smollm2-135m-instruct"
    results: dict[str, dict] = {
        "original (softmax, full KV cache)": in_subprocess(work / "eval_original.json", base),
        "window 64 + 4 sinks, no training": in_subprocess(work / "eval_window_sinks.json", base, window=64, sinks=4),
    }
    seconds = {}
    for name, overrides in configs(args.budget).items():
        if args.only and name not in args.only:
            continue
        if not (work / slug(name) / "lolcats_config.json").exists() or \
                json.loads((work / slug(name) / "lolcats_config.json").read_text()).get("status") != "complete":
            seconds[name] = train(name, overrides, work)
        results[name] = in_subprocess(work / f"eval_{slug(name)}.json", str(work / slug(name)))
    sweep = {}
    chosen_on = work / slug("sinks + offsets")
    if (chosen_on / "lolcats_config.json").exists():
        for lam in args.decays:
            sweep[lam] = in_subprocess(work / f"eval_sinks_offsets_decay_{lam}.json", str(chosen_on), decay=lam)
    ref = results["original (softmax, full KV cache)"]
    head = "| model | in-domain 1k | out-of-domain 1k | " + " | ".join(BUCKETS) + " | 4k–8k vs original |"
    lines = [f"budget: {args.budget} of the demo's; long context: Moby-Dick windows 3–4 of 8,192 tokens", "", head,
             "|---|" + "---:|" * (len(BUCKETS) + 3)]
    lines += [row(n, r, ref) for n, r in results.items()]
    if sweep:
        lines += ["", "decay set by hand on the sinks + offsets model (no training), long context only:", "",
                  "| λ₀ | " + " | ".join(BUCKETS) + " | 4k–8k vs original |", "|---|" + "---:|" * (len(BUCKETS) + 1)]
        lines += [row(f"{lam}", r, ref).replace("| – | – ", "") for lam, r in sweep.items()]
    print("\n".join(lines))
    out = {"budget": args.budget, "configs": configs(args.budget), "results": results,
           "decay_sweep": {str(k): v for k, v in sweep.items()}, "train_seconds": seconds,
           "date": time.strftime("%Y-%m-%d")}
    path = Path(args.json)
    if args.only and path.exists():  # a partial run adds its configurations to the earlier ones
        old = json.loads(path.read_text())
        if old.get("budget") == args.budget:
            old["results"].update(results)
            old["train_seconds"].update(seconds)
            old["decay_sweep"] = old.get("decay_sweep") or out["decay_sweep"]
            old["configs"], old["date"] = out["configs"], out["date"]
            out = old
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
