"""Long-context evaluation of a linearization run (``report.long_context``): perplexity by token position on
long windows and passkey retrieval by prompt length.

The softmax baselines (the original, a window alone, a window plus attention sinks) are measured before
conversion, the final model after stage 2; every result is cached so a resumed run does not measure again.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from lolcats.data import Chunks, build_eval_windows
from lolcats.eval.passkey import build_prompt, passkey_accuracy
from lolcats.eval.perplexity import token_metrics
from lolcats.generate import position_limit
from lolcats.progress import Progress
from lolcats.report_config import ReportConfig

DEPTHS = (0.1, 0.5, 0.9)
PASSKEY_SEED = 0
ANSWER_TOKENS = 12  # room passkey_accuracy keeps past a prompt for the answer

Cache = Callable[[str, Callable[[], Any]], Any]


class LongContext:
    """Measures one run's long-context results into ``results`` (stored in the run record's evals).

    Args:
        cfg: the recipe's report section.
        tokenizer: the base model's tokenizer.
        cached: ``cached(key, compute)`` returns a stored result or computes and stores it.
        progress: progress front end (one step per window or prompt).
    """

    def __init__(self, cfg: ReportConfig, tokenizer, cached: Cache, progress: Progress) -> None:
        self.cfg, self.tokenizer, self.cached, self.progress = cfg, tokenizer, cached, progress
        self._chunks: Chunks | None = None
        self.results: dict[str, Any] = {
            "data": cfg.long_context_data, "seq_len": cfg.long_context_seq_len, "windows": cfg.long_context_windows,
            "passkey_depths": list(DEPTHS), "passkey_trials": cfg.passkey_trials, "perplexity": {}, "passkey": {}}

    def check(self, model: nn.Module) -> None:
        """ValueError, naming the key to change, when a passkey prompt is too short for its filler or the
        windows or prompts are past the model's positions."""
        c = self.cfg
        shortest = min(c.passkey_lengths)
        try:
            build_prompt(self.tokenizer, shortest, DEPTHS[0], 10_000)
        except ValueError as e:
            raise ValueError(f"report.passkey_lengths holds {shortest}, too short for a passkey prompt ({e}); "
                             "give longer lengths") from None
        limit = position_limit(model)
        if limit is None:
            return
        if c.long_context_seq_len > limit:
            raise ValueError(f"report.long_context_seq_len={c.long_context_seq_len} is past the model's position "
                             f"limit of {limit}; set report.long_context_seq_len={limit} or lower")
        longest = max(c.passkey_lengths)
        if longest + ANSWER_TOKENS > limit:
            raise ValueError(f"report.passkey_lengths holds {longest}, which with the answer is past the model's "
                             f"position limit of {limit}; keep the lengths at most {limit - ANSWER_TOKENS}")

    def _tag(self) -> str:
        c = self.cfg
        return f"long_context {c.long_context_data} {c.long_context_windows}x{c.long_context_seq_len}"

    def chunks(self) -> Chunks:
        """The long windows (tokenized the first time they are needed)."""
        if self._chunks is None:
            c = self.cfg
            self._chunks = build_eval_windows(c.long_context_data, self.tokenizer, c.long_context_seq_len,
                                              c.long_context_windows)
        return self._chunks

    def perplexity(self, key: str, model: nn.Module, window: int | None = None, sinks: int = 0, tag: str = "") -> dict:
        """Perplexity by position of ``model`` (a softmax one seeing only ``window`` keys + ``sinks`` when given),
        cached under ``key`` and ``tag``."""
        def compute() -> dict:
            chunks = self.chunks()
            self.progress.start(f"long-context ppl {key}", len(chunks), unit="window")
            r = token_metrics(model, chunks, window=window, sinks=sinks, progress=self.progress.update)
            self.progress.end()
            return {"ppl": r["ppl"], "tokens": r["tokens"], "by_position": r["by_position"],
                    "window": window, "sinks": sinks if window is not None else None}

        cache_key = f"{self._tag()}/ppl/{key}" + (f" w{window}+{sinks}" if window is not None else "") + tag
        self.results["perplexity"][key] = result = self.cached(cache_key, compute)
        return result

    def passkey(self, key: str, model: nn.Module, tag: str = "") -> dict:
        """Passkey accuracy of ``model`` by prompt length (needle depths :data:`DEPTHS`), cached under ``key`` and
        ``tag``."""
        c = self.cfg

        def compute() -> dict:
            total = len(c.passkey_lengths) * len(DEPTHS) * c.passkey_trials
            self.progress.start(f"passkey {key}", total, unit="prompt")
            done = 0

            def advance(n: int) -> None:
                nonlocal done
                done += n
                self.progress.update(done)

            # final_window=0: the needle's depth is a fraction of all the filler (the report's layout, which
            # short report.passkey_lengths keep working with); `lolcats eval passkey` keeps a final window
            r = passkey_accuracy(model, self.tokenizer, c.passkey_lengths, DEPTHS, c.passkey_trials, PASSKEY_SEED,
                                 progress=advance, final_window=0)
            self.progress.end()
            return {"accuracy": r["accuracy"], "by_length": r["by_length"], "grid": r["grid"],
                    "cache_bytes": r["cache_bytes"], "runs": r["runs"]}

        cache_key = f"passkey {c.passkey_lengths} x{c.passkey_trials}/{key}{tag}"
        self.results["passkey"][key] = result = self.cached(cache_key, compute)
        return result


def _fmt(x: float | None) -> str:
    return "" if x is None else f"{x:.2f}"


def _label(label: str, r: dict[str, Any]) -> str:
    """A row label with the attention a softmax baseline kept, e.g. 'window only (64)', '… (64 + 4 sinks)'."""
    if r.get("window") is None:
        return label
    return f"{label} ({r['window']}" + (f" + {r['sinks']} sinks)" if r.get("sinks") else ")")


def long_context_section(lc: dict[str, Any], labels: dict[str, str]) -> list[str]:
    """report.md lines of the "Long context" section: perplexity by position bucket (a row per model) and
    passkey accuracy by prompt length.

    Args:
        lc: :attr:`LongContext.results` as stored in the run record.
        labels: row label per model key, in row order.
    """
    ppl, keys = lc.get("perplexity", {}), lc.get("passkey", {})
    buckets: list[str] = []
    for r in ppl.values():
        buckets += [b for b in r["by_position"] if b not in buckets]
    parts = ["## Long context", "",
             f"Perplexity by token position over the first {lc['windows']} windows of {lc['seq_len']} tokens of "
             f"{lc['data']}.", "",
             "| model | " + " | ".join(f"{b} ppl" for b in buckets) + " | all |",
             "|---|" + "---:|" * (len(buckets) + 1)]
    for key, label in labels.items():
        if key in ppl:
            r = ppl[key]
            cells = [_fmt(r["by_position"].get(b, {}).get("ppl")) for b in buckets]
            parts.append(f"| {_label(label, r)} | " + " | ".join(cells) + f" | {r['ppl']:.2f} |")
    parts.append("")
    if keys:
        lengths = list(next(iter(keys.values()))["by_length"])
        depths = ", ".join(f"{d:g}" for d in lc.get("passkey_depths", DEPTHS))
        parts += [f"Passkey retrieval accuracy by prompt length (tokens); needle depths {depths}, random keys per "
                  f"(length, depth): {lc.get('passkey_trials')}, greedy decoding.", "",
                  "| model | " + " | ".join(lengths) + " | all |", "|---|" + "---:|" * (len(lengths) + 1)]
        for key, label in labels.items():
            if key in keys:
                r = keys[key]
                cells = [f"{100 * r['by_length'][n]:.0f}%" for n in lengths]
                parts.append(f"| {label} | " + " | ".join(cells) + f" | {100 * r['accuracy']:.0f}% |")
        parts.append("")
    return parts
