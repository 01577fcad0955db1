"""What the command-line modules share: argument types, one-line errors, and tqdm progress bars (the CLI
owns output; library code reports through :class:`lolcats.progress.Progress`)."""

from __future__ import annotations

import argparse
import json
import math
import os
import typing
from collections.abc import Callable
from pathlib import Path

from tqdm import tqdm


class TqdmProgress:
    """:class:`lolcats.progress.Progress` as one tqdm bar per step: done/total, tokens/s, loss, ETA. Under
    torchrun each rank draws its own bar, labelled with its rank."""

    def __init__(self, per_rank: bool = False) -> None:
        self.bar: tqdm | None = None
        self.tokens0 = 0
        self.rank, self.world = (int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))) if per_rank \
            else (0, 1)

    def start(self, stage: str, total: int, unit: str = "step") -> None:
        desc = f"[rank {self.rank}/{self.world}] {stage}" if self.world > 1 else stage
        self.bar = tqdm(total=total, desc=desc, unit=unit, dynamic_ncols=True, position=self.rank)
        self.tokens0 = -1

    def update(self, done: int, tokens: int = 0, record: dict | None = None) -> None:
        if self.bar is None:
            return
        if self.tokens0 < 0:  # first update: account for resumed steps
            self.bar.n = done - 1
            self.tokens0 = tokens
        if tokens or record:
            elapsed = self.bar.format_dict["elapsed"] or 1e-9
            shown = {"loss": f"{record['loss']:.4g}"} if record and "loss" in record else {}
            self.bar.set_postfix(**shown, tok_s=f"{(tokens - self.tokens0) / elapsed:.0f}", refresh=False)
        self.bar.update(done - self.bar.n)

    def end(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors (``error: lolcats eval ppl: argument --seq-len: …``), exit code 2."""

    def error(self, message: str) -> typing.NoReturn:
        self.exit(2, f"error: {self.prog}: {message}; see `{self.prog} --help`\n")


def _number(kind: type, low: float | None = None, high: float | None = None, strict: bool = False
            ) -> Callable[[str], float]:
    """An argparse type: a finite ``kind`` (int or float) within the bounds, with a message saying which."""
    name = "whole number" if kind is int else "number"

    def parse(text: str) -> float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a {name}") from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"{text!r} must be a finite number")
        if low is not None and (value <= low if strict else value < low):
            raise argparse.ArgumentTypeError(
                {(int, 1): f"{value} must be a positive whole number (1 or more)", (int, 0): f"{value} must be 0 or more"}
                .get((kind, low), f"{value} must be greater than {low:g}" if strict else f"{value} must be {low:g} or more"))
        if high is not None and value > high:
            raise argparse.ArgumentTypeError(f"{value} must be between {low:g} and {high:g}")
        return value
    return parse


positive_int = _number(int, 1)
nonneg_int = _number(int, 0)
positive_float = _number(float, 0, strict=True)
unit_float = _number(float, 0, 1)


def trust_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--trust-remote-code", action="store_true",
                   help="let the base model's own Python code run (only for checkpoints you trust; never read "
                        "from a file being loaded)")


def model_flags(p: argparse.ArgumentParser) -> None:
    """``--trust-remote-code``, ``--sparse-cache G`` and ``--softmax-layers`` for a command that loads a model to
    run it."""
    trust_flag(p)
    p.add_argument("--sparse-cache", type=_number(int, 0), default=None, metavar="G",
                   help="give every linearized layer a sparse global cache of G key/value pairs per key/value head "
                        "(0-256; retrieval beyond the window, no training: docs/design.md §1)")
    p.add_argument("--softmax-layers", type=_number(int, 0), nargs="+", default=None, metavar="L",
                   help="run these linearized layers as the model's own softmax attention (their KV cache grows "
                        "with the context), without retraining: to try layers before attention.softmax_layers")


def load_for_run(args: argparse.Namespace):
    """(model, tokenizer) of ``args.model``, with ``--softmax-layers`` and ``--sparse-cache`` applied (refused
    for a softmax model)."""
    from lolcats.attention import set_sparse_cache
    from lolcats.checkpoint import load_model_any
    from lolcats.layer_choice import linearized_ids, restore_softmax

    model, tokenizer = load_model_any(args.model, trust_remote_code=args.trust_remote_code)
    layers = getattr(args, "softmax_layers", None)
    if layers:
        linear = linearized_ids(model)
        bad = sorted(set(layers) - set(linear))
        if bad:
            raise ValueError(f"--softmax-layers {' '.join(map(str, bad))}: not linearized layers of {args.model} "
                             f"(linearized: {' '.join(map(str, linear)) or 'none'})")
        restore_softmax(model, sorted(set(layers)))
    size = getattr(args, "sparse_cache", None)
    if size is not None:
        if size > 256:
            raise ValueError(f"--sparse-cache {size} is above 256; give at most 256 pairs per key/value head")
        if set_sparse_cache(model, size) == 0:
            raise ValueError(f"--sparse-cache applies to linearized layers, and {args.model} has none; drop "
                             "--sparse-cache or give a lolcats out_dir")
    return model, tokenizer


def write_json(path: str, record: dict) -> None:
    """Write a result JSON (atomically), creating its folder."""
    from lolcats.io import atomic_write_text

    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, json.dumps(record, indent=1))


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
