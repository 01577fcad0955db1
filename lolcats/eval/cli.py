"""The ``lolcats eval …`` and ``lolcats generate`` commands: load a model (an out_dir, an export, an HF
folder or id, a .gguf file), evaluate or generate, print a table, optionally write JSON."""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import Callable, Iterator

from lolcats.cli_common import (
    TqdmProgress,
    load_for_run,
    model_flags,
    nonneg_int,
    positive_float,
    positive_int,
    unit_float,
    write_json,
)


@contextlib.contextmanager
def _counting(progress: TqdmProgress, stage: str, total: int, unit: str) -> Iterator[Callable[[int], None]]:
    """Evaluators report items as they finish (``advance(n)``); the progress front end wants the running count."""
    done = 0

    def advance(n: int) -> None:
        nonlocal done
        done += n
        progress.update(done)

    progress.start(stage, total, unit)
    try:
        yield advance
    finally:
        progress.end()


def _window_label(window: int | None, sinks: int) -> str:
    """'' for the model as it is, else e.g. ' (window 64 + 4 sinks)'."""
    if window is None:
        return ""
    return f" (window {window}" + (f" + {sinks} sinks)" if sinks else ")")


def _eval_ppl(args: argparse.Namespace) -> int:

    from lolcats.checkpoint import load_model_any
    from lolcats.convert import linearized_layers
    from lolcats.data import build_eval_windows
    from lolcats.eval.perplexity import token_metrics

    if args.sinks is not None and args.window is None:
        raise ValueError(f"--sinks {args.sinks} needs --window: sinks are kept beside a window of recent tokens; "
                         "add --window W (e.g. --window 64)")
    sinks = args.sinks or 0
    model, tokenizer = load_for_run(args)
    if args.window is not None and linearized_layers(model):
        raise ValueError(f"--window scores a softmax model with only a window of recent tokens, but {args.model} is "
                         f"linearized ({len(linearized_layers(model))} layers swapped); give the original softmax "
                         "model (the run's base) for the baseline, or drop --window to score this one")
    teacher = load_model_any(args.teacher, trust_remote_code=args.trust_remote_code)[0] if args.teacher else None
    chunks = build_eval_windows(args.data, tokenizer, args.seq_len, args.windows, skip=args.skip_windows)
    r = token_metrics(model, chunks, teacher, window=args.window, sinks=sinks)
    label = _window_label(args.window, sinks)
    print(f"perplexity{label} {r['ppl']:.3f} over {len(chunks)} windows of {args.seq_len} tokens of {args.data} "
          f"({r['tokens']} predicted tokens)")
    if teacher is not None:
        print(f"teacher perplexity {r['teacher_ppl']:.3f}; KL(teacher‖model) {r['kl']:.4f} nats/token; "
              f"top-1 agreement {100 * r['top1_agreement']:.2f}%")
    print(f"| positions | tokens | perplexity{label} |" + (" teacher perplexity |" if teacher is not None else ""))
    print("|---|---:|---:|" + ("---:|" if teacher is not None else ""))
    for name, b in r["by_position"].items():
        extra = f" {r['teacher_by_position'][name]['ppl']:.3f} |" if teacher is not None else ""
        print(f"| {name} | {b['tokens']} | {b['ppl']:.3f} |{extra}")
    if args.out:
        write_json(args.out, {"model": args.model, "teacher": args.teacher, "data": args.data,
                              "seq_len": args.seq_len, "windows": len(chunks), "skip_windows": args.skip_windows,
                              "window": args.window,
                              "sinks": sinks if args.window is not None else None, **r})
        print(f"results written to {args.out}")
    return 0


def _eval_mmlu(args: argparse.Namespace) -> int:

    from lolcats.base_model import cast_base, fingerprint
    from lolcats.convert import linearized_layers
    from lolcats.eval.mmlu import evaluate_mmlu, summary_table
    from lolcats.eval.mmlu_data import load_mmlu

    if not 0 <= args.shots <= 5:
        raise ValueError(f"--shots must be between 0 and 5, got {args.shots}")
    data = load_mmlu(args.data).select(args.subjects, args.limit)
    model, tokenizer = load_for_run(args)
    cast_base(model, args.dtype)
    total = sum(len(v) for v in data.test.values())
    with _counting(TqdmProgress(), "mmlu", total, "question") as advance:
        result = evaluate_mmlu(model, tokenizer, data, shots=args.shots, batch_size=args.batch_size,
                               cached=not args.no_cache, progress=advance)
    result = {"model": args.model, "linearized": bool(linearized_layers(model)), "model_fingerprint": fingerprint(model),
              "model_class": type(model).__name__, "dtype": args.dtype, **result}
    print(summary_table(result))
    print(f"{result['items']} items in {result['seconds']:.0f} s ({result['items'] / result['seconds']:.2f} items/s); "
          f"{data.exemplar_rule}")
    if args.out:
        write_json(args.out, result)
        print(f"results written to {args.out}")
    return 0


def _eval_passkey(args: argparse.Namespace) -> int:
    from pathlib import Path

    from lolcats.eval import needles, passkey
    from lolcats.generate import position_limit

    multi = args.task == "multi-needle"
    if not multi and (args.needles is not None or args.data is not None):
        raise ValueError("--needles and --data set up the multi-needle task; add --task multi-needle or drop them")
    if multi and args.needles is not None and args.depths is not None and args.needles != len(args.depths):
        raise ValueError(f"--needles {args.needles} but {len(args.depths)} --depths: a needle goes at each depth; "
                         "give one of the two")
    model, tokenizer = load_for_run(args)
    lengths = args.lengths or passkey.default_lengths(position_limit(model))
    if multi:
        depths = args.depths or needles.needle_depths(args.needles or needles.NEEDLES)
        trials = args.trials or 3
    else:
        depths, trials = args.depths or list(passkey.DEPTHS), args.trials or 2
    with _counting(TqdmProgress(), args.task, len(lengths) * len(depths) * trials, "prompt") as advance:
        if multi:
            result = needles.multi_needle_accuracy(model, tokenizer, lengths, depths, trials, args.seed,
                                                   args.data or needles.DATA, advance, args.final_window)
        else:
            result = passkey.passkey_accuracy(model, tokenizer, lengths, depths, trials, args.seed, advance,
                                              args.final_window)
    print(passkey.table(result))
    per_length = len(depths) * trials
    print(f"overall accuracy {100 * result['accuracy']:.1f}% over {len(result['runs'])} prompts ({per_length} per "
          f"length{', fewer than 10' if per_length < 10 else ''}); cache bytes: one sequence after the prompt")
    out, name = Path(args.out), args.task.replace("-", "_")
    write_json(str(out / f"{name}.json"), {"model": args.model, "seed": args.seed, **result})
    passkey.heatmap(result, out / f"{name}.png", title=f"{args.task} retrieval: {args.model}")
    print(f"results written to {out / f'{name}.json'} and {out / f'{name}.png'}")
    return 0


def _eval_harness(args: argparse.Namespace) -> int:

    from lolcats.eval.lm_eval import run_harness, table

    tasks = [t for part in args.tasks for t in part.split(",") if t]
    model, tokenizer = load_for_run(args)
    result = run_harness(model, tokenizer, tasks, num_fewshot=args.num_fewshot, limit=args.limit,
                         batch_size=args.batch_size, include_path=args.include_path)
    print(table(result))
    if args.out:
        write_json(args.out, {"model": args.model, **result})
        print(f"results written to {args.out}")
    return 0


def _generate(args: argparse.Namespace) -> int:
    from transformers import TextStreamer

    from lolcats.generate import generate_text

    if not args.prompt or not args.prompt.strip():
        raise ValueError("the prompt is empty; pass some text with --prompt")
    model, tokenizer = load_for_run(args)
    streamer = TextStreamer(tokenizer, skip_prompt=True) if args.stream else None
    text = generate_text(model, tokenizer, args.prompt, args.max_new_tokens, do_sample=args.sample,
                         temperature=args.temperature, top_p=args.top_p, streamer=streamer,
                         stop_strings=args.stop or None)
    if not args.stream:
        print(args.prompt + text)
    return 0


def add_parsers(sub: argparse._SubParsersAction) -> None:
    """Register ``generate`` and ``eval {ppl,mmlu,passkey,harness}`` on the top-level subparsers."""
    p = sub.add_parser("generate", help="generate text (constant-memory decoding for linearized models)")
    p.add_argument("model", help="an out_dir, an exported folder, an HF folder or id, or a .gguf file")
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-new-tokens", type=positive_int, default=64)
    p.add_argument("--stream", action="store_true", help="print tokens as they come")
    p.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--temperature", type=positive_float, default=1.0)
    p.add_argument("--top-p", type=unit_float, default=1.0)
    p.add_argument("--stop", action="append", help="stop string (repeatable)")
    model_flags(p)
    p.set_defaults(func=_generate)

    ev = sub.add_parser("eval", help="evaluate a model").add_subparsers(dest="eval_command", required=True)
    p = ev.add_parser("ppl", help="held-out perplexity over fixed windows, by position bucket; KL to a teacher")
    p.add_argument("model", help="an out_dir, an HF folder or id, or a .gguf file")
    p.add_argument("--data", default="lolcats:moby_dick")
    p.add_argument("--seq-len", type=positive_int, default=1024)
    p.add_argument("--windows", type=positive_int, default=6)
    p.add_argument("--skip-windows", type=nonneg_int, default=0,
                   help="start after this many windows (e.g. 2: tune on windows 3-4, judge on 1-2)")
    p.add_argument("--teacher", help="a reference model (e.g. the original): adds KL(teacher‖model) and top-1 agreement")
    p.add_argument("--window", type=positive_int,
                   help="score a softmax model with only a sliding window of this many keys (the window baseline)")
    p.add_argument("--sinks", type=nonneg_int,
                   help="with --window: each query also sees the first this many tokens (attention sinks)")
    p.add_argument("--out", help="write the result JSON here")
    model_flags(p)
    p.set_defaults(func=_eval_ppl)

    p = ev.add_parser("mmlu", help="few-shot MMLU (cached subject prefixes, batched questions)")
    p.add_argument("model", help="an out_dir, an exported folder, an HF folder or id, or a .gguf file")
    p.add_argument("--data", default="lolcats:mmlu",
                   help="lolcats:mmlu (offline default), hf:cais/mmlu, a Hendrycks folder (dev/, test/) or a .jsonl")
    p.add_argument("--shots", type=int, default=5, help="0-5 exemplars")
    p.add_argument("--limit", type=positive_int, help="at most this many scored items per subject")
    p.add_argument("--subjects", nargs="+", help="subjects to run (spaces or underscores)")
    p.add_argument("--batch-size", type=positive_int, default=4,
                   help="questions per forward pass (4 was fastest on a 2-core CPU; GPUs want more)")
    p.add_argument("--no-cache", action="store_true", help="run every prompt alone from scratch (slow reference)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="base weights' dtype (bfloat16 is several times faster on CPUs with AMX)")
    p.add_argument("--out", help="write the result JSON here")
    model_flags(p)
    p.set_defaults(func=_eval_mmlu)

    p = ev.add_parser("passkey", help="long-context retrieval: a number hidden in filler text (or several in a book)")
    p.add_argument("model", help="an out_dir, an exported folder, an HF folder or id, or a .gguf file")
    p.add_argument("--task", choices=["passkey", "multi-needle"], default="passkey",
                   help="passkey: one key in repeated filler; multi-needle: several word-number pairs in natural "
                        "text, one asked for")
    p.add_argument("--lengths", type=positive_int, nargs="+",
                   help="prompt tokens (default 1024 2048 4096 8000, those below the model's position limit)")
    p.add_argument("--depths", type=unit_float, nargs="+",
                   help="needle depths, fractions of the text before the final window (default 0.1 0.3 0.5 0.7 "
                        "0.9; multi-needle: a needle at each, default --needles spread over 0.1-0.9)")
    p.add_argument("--needles", type=positive_int, help="multi-needle: pairs per prompt (default 4)")
    p.add_argument("--trials", type=positive_int,
                   help="prompts per (length, depth) (default 2 for passkey, 3 for multi-needle)")
    p.add_argument("--final-window", type=nonneg_int, default=128,
                   help="the prompt's last tokens, where no needle goes (at least the model's softmax window)")
    p.add_argument("--data", help="multi-needle: the text the needles hide in (default lolcats:moby_dick)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="passkey", help="folder for passkey.json / multi_needle.json and a heat map")
    model_flags(p)
    p.set_defaults(func=_eval_passkey)

    p = ev.add_parser("harness", help="lm-eval harness tasks on the (linearized) model (extra `eval`)")
    p.add_argument("model", help="an out_dir, an exported folder, an HF folder or id, or a .gguf file")
    p.add_argument("--tasks", nargs="+", required=True, help="e.g. piqa arc_easy arc_challenge hellaswag winogrande")
    p.add_argument("--num-fewshot", type=nonneg_int)
    p.add_argument("--limit", type=positive_int, help="items per task")
    p.add_argument("--batch-size", type=positive_int, default=1)
    p.add_argument("--include-path", help="a folder of extra task YAMLs (local data)")
    p.add_argument("--out", help="write the result JSON here")
    model_flags(p)
    p.set_defaults(func=_eval_harness)
