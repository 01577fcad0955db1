"""The ``lolcats`` command line. Library code never prints; this module owns output and progress bars."""

from __future__ import annotations

import argparse
import logging
import sys
import typing
import warnings

from tqdm import tqdm

from lolcats import distributed

logger = logging.getLogger("lolcats")


class TqdmProgress:
    """One progress bar per stage: steps, tokens/s, loss, ETA."""

    def __init__(self) -> None:
        self.bar: tqdm | None = None
        self.tokens0 = 0

    def start(self, stage: str, total_steps: int, position: int = 0) -> None:
        self.bar = tqdm(total=total_steps, desc=stage, unit="step", dynamic_ncols=True, position=position)
        self.tokens0 = -1

    def update(self, step: int, tokens: int, record: dict) -> None:
        if self.bar is None:
            return
        if self.tokens0 < 0:  # first update: account for resumed steps
            self.bar.n = step - 1
            self.tokens0 = tokens
        elapsed = self.bar.format_dict["elapsed"] or 1e-9
        shown = {"loss": f"{record['loss']:.4g}"} if "loss" in record else {}
        self.bar.set_postfix(**shown, tok_s=f"{(tokens - self.tokens0) / elapsed:.0f}", refresh=False)
        self.bar.update(step - self.bar.n)

    def end(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _linearize(args: argparse.Namespace) -> int:
    from lolcats.config import load_config
    from lolcats.pipeline import linearize

    cfg = load_config(args.recipe, args.overrides)
    result = linearize(cfg, overwrite=args.overwrite, progress=TqdmProgress())
    if distributed.is_main():  # under torchrun / accelerate launch, rank 0 speaks
        if result.table:
            print(result.table)
        print(f"results in {result.out_dir} (report: {result.report})")
    return 0


def _rank_bar(desc: str, total: int) -> TqdmProgress:
    """A progress bar for block-by-block steps; under torchrun each rank draws its own, labelled."""
    import os

    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    bar = TqdmProgress()
    bar.start(f"[rank {rank}/{world}] {desc}" if world > 1 else desc, total, position=rank)
    return bar


def _blockwise(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from lolcats import blockwise
    from lolcats.config import load_config

    cfg = load_config(args.recipe, args.overrides)
    if args.blockwise_command == "plan":
        p = blockwise.plan(cfg, tokens=args.tokens, model_config=args.model_config, recipe_dir=Path(args.recipe).parent)
        print(blockwise.format_plan(p))
        if args.json:
            Path(args.json).write_text(json.dumps(p, indent=1))
            print(f"plan written to {args.json}")
    elif args.blockwise_command == "precompute":
        r = blockwise.precompute(cfg, progress=_rank_bar)
        for problem in r.problems:
            print(f"found: {problem}")
        print(f"hidden states in {r.hidden_dir}: {len(r.written)} shards written, {r.verified} verified and kept"
              + (f"; peak layer weights {r.peak_param_bytes / 1e6:.1f} MB, hidden states in flight "
                 f"{r.inflight_bytes / 1e6:.1f} MB" if r.written else ""))
        for name in r.written:
            print(f"  wrote {name}")
    elif args.blockwise_command == "train":
        results = blockwise.train(cfg, blocks=args.blocks, progress=_rank_bar)
        if results is not None:
            print(blockwise.format_summary(results))
            print(f"block weights and metrics in {Path(cfg.out_dir) / 'blockwise'}")
    else:
        result = blockwise.stitch(cfg, progress=TqdmProgress())
        if distributed.is_main():
            if result.table:
                print(result.table)
            print(f"results in {result.out_dir} (report: {result.report})")
    return 0


def _export(args: argparse.Namespace) -> int:
    from lolcats.checkpoint import export_merged

    if not args.merge:
        raise ValueError("export writes a merged model; pass --merge (unmerged adapters already live in OUT_DIR/adapter)")
    dest = export_merged(args.out_dir, args.to, trust_remote_code=args.trust_remote_code)
    print(f"merged model written to {dest} (check it later with `lolcats verify {dest}`)")
    return 0


def _verify(args: argparse.Namespace) -> int:
    from lolcats.checkpoint import verify_export

    n = verify_export(args.folder)
    print(f"{args.folder}: all {n} files match the sha256 recorded when they were written")
    return 0


def _eval_ppl(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from lolcats.checkpoint import load_model_any
    from lolcats.data import build_eval_windows
    from lolcats.eval.perplexity import token_metrics
    from lolcats.io import atomic_write_text

    model, tokenizer = load_model_any(args.model, trust_remote_code=args.trust_remote_code)
    teacher = load_model_any(args.teacher, trust_remote_code=args.trust_remote_code)[0] if args.teacher else None
    chunks = build_eval_windows(args.data, tokenizer, args.seq_len, args.windows)
    r = token_metrics(model, chunks, teacher)
    print(f"perplexity {r['ppl']:.3f} over {len(chunks)} windows of {args.seq_len} tokens of {args.data} "
          f"({r['tokens']} predicted tokens)")
    if teacher is not None:
        print(f"teacher perplexity {r['teacher_ppl']:.3f}; KL(teacher‖model) {r['kl']:.4f} nats/token; "
              f"top-1 agreement {100 * r['top1_agreement']:.2f}%")
    print("| positions | tokens | perplexity |" + (" teacher perplexity |" if teacher is not None else ""))
    print("|---|---:|---:|" + ("---:|" if teacher is not None else ""))
    for name, b in r["by_position"].items():
        extra = f" {r['teacher_by_position'][name]['ppl']:.3f} |" if teacher is not None else ""
        print(f"| {name} | {b['tokens']} | {b['ppl']:.3f} |{extra}")
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        record = {"model": args.model, "teacher": args.teacher, "data": args.data, "seq_len": args.seq_len,
                  "windows": len(chunks), **r}
        atomic_write_text(out, json.dumps(record, indent=1))
        print(f"results written to {out}")
    return 0


def _eval_mmlu(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from lolcats.checkpoint import cast_base, fingerprint, load_model_any
    from lolcats.convert import linearized_layers
    from lolcats.eval.mmlu import evaluate_mmlu, summary_table
    from lolcats.eval.mmlu_data import load_mmlu
    from lolcats.io import atomic_write_text

    if not 0 <= args.shots <= 5:
        raise ValueError(f"--shots must be between 0 and 5, got {args.shots}")
    data = load_mmlu(args.data).select(args.subjects, args.limit)
    model, tokenizer = load_model_any(args.model, trust_remote_code=args.trust_remote_code)
    cast_base(model, args.dtype)
    total = sum(len(v) for v in data.test.values())
    with tqdm(total=total, desc="mmlu", unit="q", dynamic_ncols=True) as bar:
        result = evaluate_mmlu(model, tokenizer, data, shots=args.shots, batch_size=args.batch_size,
                               cached=not args.no_cache, progress=bar.update)
    result = {"model": args.model, "linearized": bool(linearized_layers(model)), "model_fingerprint": fingerprint(model),
              "model_class": type(model).__name__, "dtype": args.dtype, **result}
    print(summary_table(result))
    print(f"{result['items']} items in {result['seconds']:.0f} s ({result['items'] / result['seconds']:.2f} items/s); "
          f"{data.exemplar_rule}")
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out, json.dumps(result, indent=1))
        print(f"results written to {out}")
    return 0


def _eval_passkey(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from lolcats.checkpoint import load_model_any
    from lolcats.eval.passkey import heatmap, passkey_accuracy, table
    from lolcats.io import atomic_write_text

    if args.trials < 1:
        raise ValueError(f"--trials must be at least 1, got {args.trials}")
    model, tokenizer = load_model_any(args.model, trust_remote_code=args.trust_remote_code)
    total = len(args.lengths) * len(args.depths) * args.trials
    with tqdm(total=total, desc="passkey", unit="prompt", dynamic_ncols=True) as bar:
        result = passkey_accuracy(model, tokenizer, args.lengths, args.depths, args.trials, args.seed,
                                  progress=bar.update)
    print(table(result))
    print(f"overall accuracy {100 * result['accuracy']:.1f}% over {len(result['runs'])} prompts")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "passkey.json", json.dumps({"model": args.model, **result}, indent=1))
    heatmap(result, out / "passkey.png", title=f"passkey retrieval: {args.model}")
    print(f"results written to {out / 'passkey.json'} and {out / 'passkey.png'}")
    return 0


def _eval_harness(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from lolcats.checkpoint import load_model_any
    from lolcats.eval.lm_eval import run_harness, table
    from lolcats.io import atomic_write_text

    tasks = [t for part in args.tasks for t in part.split(",") if t]
    model, tokenizer = load_model_any(args.model, trust_remote_code=args.trust_remote_code)
    result = run_harness(model, tokenizer, tasks, num_fewshot=args.num_fewshot, limit=args.limit,
                         batch_size=args.batch_size, include_path=args.include_path)
    print(table(result))
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out, json.dumps({"model": args.model, **result}, indent=1))
        print(f"results written to {out}")
    return 0


def _generate(args: argparse.Namespace) -> int:
    from transformers import TextStreamer

    from lolcats.checkpoint import load_model_any
    from lolcats.generate import generate_text

    if not args.prompt or not args.prompt.strip():
        raise ValueError("the prompt is empty; pass some text with --prompt")
    model, tokenizer = load_model_any(args.model, trust_remote_code=args.trust_remote_code)
    streamer = TextStreamer(tokenizer, skip_prompt=True) if args.stream else None
    text = generate_text(model, tokenizer, args.prompt, args.max_new_tokens, do_sample=args.sample,
                         temperature=args.temperature, top_p=args.top_p, streamer=streamer,
                         stop_strings=args.stop or None)
    if not args.stream:
        print(args.prompt + text)
    return 0


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (``error: lolcats eval ppl: argument --seq-len: …``), exit code 2."""

    def error(self, message: str) -> typing.NoReturn:
        self.exit(2, f"error: {self.prog}: {message}; see `{self.prog} --help`\n")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be a positive whole number (1 or more)")
    return value


def _nonneg_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{value} must be 0 or more")
    return value


def _float(text: str) -> float:
    import math

    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} must be a finite number")
    return value


def _positive_float(text: str) -> float:
    value = _float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{value} must be greater than 0")
    return value


def _unit_float(text: str) -> float:
    value = _float(text)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"{value} must be between 0 and 1")
    return value


def _trust_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--trust-remote-code", action="store_true",
                   help="let the base model's own Python code run (only for checkpoints you trust; never read "
                        "from a file being loaded)")


def describe_error(e: BaseException) -> tuple[str, int]:
    """One line for any failure: ``<what> (<file>): <fix>`` and the exit code (2 expected, 1 a bug)."""
    from json import JSONDecodeError

    try:
        from safetensors import SafetensorError
    except ImportError:  # pragma: no cover
        SafetensorError = OSError  # noqa: N806
    line = " ".join(str(e).split())
    if isinstance(e, (ValueError, TypeError, FileNotFoundError, FileExistsError, RuntimeError, ImportError)) \
            and not isinstance(e, (JSONDecodeError, UnicodeDecodeError)):
        return line, 2
    if isinstance(e, OSError):
        what = e.strerror or line
        where = f" ({e.filename})" if e.filename else ""
        return f"{what}{where}: check the path, its permissions and the free disk space", 2
    if isinstance(e, SafetensorError):
        return f"a safetensors file could not be read ({line}): it is truncated or damaged; restore it", 2
    if isinstance(e, (JSONDecodeError, UnicodeDecodeError)):
        return f"a file could not be parsed ({line}): it is damaged or not the expected kind of file", 2
    return f"unexpected {type(e).__name__}: {line}; rerun with -v for the traceback and report it", 1


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="lolcats", description="Linearize Hugging Face causal LMs (LoLCATs).")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("linearize", help="stage 1 + stage 2 into out_dir (resumable)")
    p.add_argument("recipe", help="recipe YAML, e.g. recipes/smollm2_135m.yaml")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. distill.max_steps=10")
    p.add_argument("--overwrite", action="store_true", help="delete out_dir if it holds another run")
    p.set_defaults(func=_linearize)

    bw = sub.add_parser("blockwise", help="block-by-block stage 1 for 70B-405B models").add_subparsers(
        dest="blockwise_command", required=True)
    for name, text in (("plan", "block split, disk need and memory per block, from the config alone"),
                       ("precompute", "write each block's input hidden states (streams one layer at a time)"),
                       ("train", "train blocks from their stored inputs (torchrun: one block per rank at a time)"),
                       ("stitch", "merge the blocks' weights, then stage 2 as in `linearize`")):
        p = bw.add_parser(name, help=text)
        p.add_argument("recipe", help="recipe YAML, e.g. recipes/llama3_1_405b.yaml")
        p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. blockwise.block_size=2")
        if name == "plan":
            p.add_argument("--tokens", type=_positive_int, help="tokens to plan for (default: blockwise.tokens)")
            p.add_argument("--model-config", help="a config.json (default: blockwise.model_config or the model folder)")
            p.add_argument("--json", help="also write the plan as JSON here")
        if name == "train":
            p.add_argument("--blocks", type=_nonneg_int, nargs="+", help="only these blocks (default: all)")
        p.set_defaults(func=_blockwise)

    p = sub.add_parser("export", help="write a self-contained merged model")
    p.add_argument("out_dir")
    p.add_argument("--merge", action="store_true", help="merge LoRA into the base weights")
    p.add_argument("--to", required=True, help="destination folder")
    _trust_flag(p)
    p.set_defaults(func=_export)

    p = sub.add_parser("verify", help="check an out_dir or exported model against its recorded sha256 checksums")
    p.add_argument("folder")
    p.set_defaults(func=_verify)

    p = sub.add_parser("generate", help="generate text (constant-memory decoding for linearized models)")
    p.add_argument("model", help="an out_dir, an exported folder, an HF folder or id, or a .gguf file")
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-new-tokens", type=_positive_int, default=64)
    p.add_argument("--stream", action="store_true", help="print tokens as they come")
    p.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--temperature", type=_positive_float, default=1.0)
    p.add_argument("--top-p", type=_unit_float, default=1.0)
    p.add_argument("--stop", action="append", help="stop string (repeatable)")
    _trust_flag(p)
    p.set_defaults(func=_generate)

    ev = sub.add_parser("eval", help="evaluate a model").add_subparsers(dest="eval_command", required=True)
    p = ev.add_parser("ppl", help="held-out perplexity over fixed windows, by position bucket; KL to a teacher")
    p.add_argument("model", help="an out_dir, an HF folder or id, or a .gguf file")
    p.add_argument("--data", default="lolcats:moby_dick")
    p.add_argument("--seq-len", type=_positive_int, default=1024)
    p.add_argument("--windows", type=_positive_int, default=6)
    p.add_argument("--teacher", help="a reference model (e.g. the original): adds KL(teacher‖model) and top-1 agreement")
    p.add_argument("--out", help="write the result JSON here")
    _trust_flag(p)
    p.set_defaults(func=_eval_ppl)

    p = ev.add_parser("mmlu", help="few-shot MMLU (cached subject prefixes, batched questions)")
    p.add_argument("model", help="an out_dir, an exported folder, an HF folder or id, or a .gguf file")
    p.add_argument("--data", default="lolcats:mmlu",
                   help="lolcats:mmlu (offline default), hf:cais/mmlu, a Hendrycks folder (dev/, test/) or a .jsonl")
    p.add_argument("--shots", type=int, default=5, help="0-5 exemplars")
    p.add_argument("--limit", type=_positive_int, help="at most this many scored items per subject")
    p.add_argument("--subjects", nargs="+", help="subjects to run (spaces or underscores)")
    p.add_argument("--batch-size", type=_positive_int, default=4,
                   help="questions per forward pass (4 was fastest on a 2-core CPU; GPUs want more)")
    p.add_argument("--no-cache", action="store_true", help="run every prompt alone from scratch (slow reference)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="base weights' dtype (bfloat16 is several times faster on CPUs with AMX)")
    p.add_argument("--out", help="write the result JSON here")
    _trust_flag(p)
    p.set_defaults(func=_eval_mmlu)

    p = ev.add_parser("passkey", help="long-context retrieval of a number hidden in filler text")
    p.add_argument("model", help="an out_dir, an exported folder, an HF folder or id, or a .gguf file")
    p.add_argument("--lengths", type=_positive_int, nargs="+", default=[512, 1024, 2048, 4096], help="prompt tokens")
    p.add_argument("--depths", type=_unit_float, nargs="+", default=[0.0, 0.25, 0.5, 0.75, 1.0],
                   help="fraction of the filler before the needle")
    p.add_argument("--trials", type=_positive_int, default=2, help="random keys per (length, depth)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="passkey", help="folder for passkey.json and passkey.png")
    _trust_flag(p)
    p.set_defaults(func=_eval_passkey)

    p = ev.add_parser("harness", help="lm-eval harness tasks on the (linearized) model (extra `eval`)")
    p.add_argument("model", help="an out_dir, an exported folder, an HF folder or id, or a .gguf file")
    p.add_argument("--tasks", nargs="+", required=True, help="e.g. piqa arc_easy arc_challenge hellaswag winogrande")
    p.add_argument("--num-fewshot", type=_nonneg_int)
    p.add_argument("--limit", type=_positive_int, help="items per task")
    p.add_argument("--batch-size", type=_positive_int, default=1)
    p.add_argument("--include-path", help="a folder of extra task YAMLs (local data)")
    p.add_argument("--out", help="write the result JSON here")
    _trust_flag(p)
    p.set_defaults(func=_eval_harness)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for noisy in ("httpx", "urllib3", "transformers", "peft", "matplotlib"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    import transformers

    transformers.utils.logging.disable_progress_bar()
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 (the CLI turns every failure into one line; -v shows the traceback)
        if args.verbose:
            raise
        message, code = describe_error(e)
        print(f"error: {message}", file=sys.stderr)
        return code
    finally:
        distributed.shutdown()


if __name__ == "__main__":
    sys.exit(main())
