"""The ``lolcats`` command line. Library code never prints; this module owns output and progress bars."""

from __future__ import annotations

import argparse
import logging
import sys
import warnings

from lolcats import distributed
from lolcats.cli_common import Parser, TqdmProgress, describe_error, nonneg_int, positive_int, trust_flag

logger = logging.getLogger("lolcats")


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


def _plan(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from lolcats.config import load_config
    from lolcats.plan import format_full, plan

    cfg = load_config(args.recipe, args.overrides)
    p = plan(cfg, tokens=args.tokens, model_config=args.model_config, recipe_dir=Path(args.recipe).parent,
             devices=args.devices)
    print(format_full(p))
    if args.json:
        Path(args.json).write_text(json.dumps(p, indent=1))
        print(f"plan written to {args.json}")
    return 0


def _plan_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("recipe", help="recipe YAML, e.g. recipes/llama3_1_8b.yaml")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. data.seq_len=4096")
    p.add_argument("--devices", type=positive_int, default=1, help="N devices a sharded run (model.sharding: fsdp) "
                   "divides the base over (default 1)")
    p.add_argument("--tokens", type=positive_int, help="the training data's size in tokens (default: blockwise.tokens)")
    p.add_argument("--model-config", help="a config.json (default: blockwise.model_config or the model folder)")
    p.add_argument("--json", help="also write the plan as JSON here")
    p.set_defaults(func=_plan)


def _blockwise(args: argparse.Namespace) -> int:
    from pathlib import Path

    from lolcats import blockwise
    from lolcats.config import load_config

    cfg = load_config(args.recipe, args.overrides)
    blockwise.check_supported(cfg)
    if args.blockwise_command == "precompute":
        r = blockwise.precompute(cfg, progress=TqdmProgress(per_rank=True))
        for problem in r.problems:
            print(f"found: {problem}")
        print(f"hidden states in {r.hidden_dir}: {len(r.written)} shards written, {r.verified} verified and kept"
              + (f"; peak layer weights {r.peak_param_bytes / 1e6:.1f} MB, hidden states in flight "
                 f"{r.inflight_bytes / 1e6:.1f} MB" if r.written else ""))
        for name in r.written:
            print(f"  wrote {name}")
    elif args.blockwise_command == "train":
        results = blockwise.train(cfg, blocks=args.blocks, progress=TqdmProgress(per_rank=True))
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
    from lolcats.export import export_merged

    if not args.merge:
        raise ValueError("export writes a merged model; pass --merge (unmerged adapters already live in OUT_DIR/adapter)")
    dest = export_merged(args.out_dir, args.to, trust_remote_code=args.trust_remote_code)
    print(f"merged model written to {dest} (check it later with `lolcats verify {dest}`)")
    return 0


def _verify(args: argparse.Namespace) -> int:
    from lolcats.export import verify_export

    n = verify_export(args.folder)
    print(f"{args.folder}: all {n} files match the sha256 recorded when they were written")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="lolcats", description="Linearize Hugging Face causal LMs (LoLCATs).")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("linearize", help="stage 1 + stage 2 into out_dir (resumable)")
    p.add_argument("recipe", help="recipe YAML, e.g. recipes/smollm2_135m.yaml")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. distill.max_steps=10")
    p.add_argument("--overwrite", action="store_true", help="delete out_dir if it holds another run")
    p.set_defaults(func=_linearize)

    _plan_options(sub.add_parser("plan", help="memory per stage and device, token budget and block-by-block disk, "
                                 "from the model config alone"))

    bw = sub.add_parser("blockwise", help="block-by-block stage 1 for 70B-405B models").add_subparsers(
        dest="blockwise_command", required=True)
    _plan_options(bw.add_parser("plan", help="the same as `lolcats plan`"))
    for name, text in (("precompute", "write each block's input hidden states (streams one layer at a time)"),
                       ("train", "train blocks from their stored inputs (torchrun: one block per rank at a time)"),
                       ("stitch", "merge the blocks' weights, then stage 2 as in `linearize`")):
        p = bw.add_parser(name, help=text)
        p.add_argument("recipe", help="recipe YAML, e.g. recipes/llama3_1_405b.yaml")
        p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. blockwise.block_size=2")
        if name == "train":
            p.add_argument("--blocks", type=nonneg_int, nargs="+", help="only these blocks (default: all)")
        p.set_defaults(func=_blockwise)

    p = sub.add_parser("export", help="write a self-contained merged model")
    p.add_argument("out_dir")
    p.add_argument("--merge", action="store_true", help="merge LoRA into the base weights")
    p.add_argument("--to", required=True, help="destination folder")
    trust_flag(p)
    p.set_defaults(func=_export)

    p = sub.add_parser("verify", help="check an out_dir or exported model against its recorded sha256 checksums")
    p.add_argument("folder")
    p.set_defaults(func=_verify)

    from lolcats.eval.cli import add_parsers

    add_parsers(sub)
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
