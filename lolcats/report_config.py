"""The recipe's ``report`` section (re-exported by :mod:`lolcats.config`, which holds the other sections)."""

from __future__ import annotations

from dataclasses import dataclass, field

from lolcats.schema import check_int


@dataclass
class ReportConfig:
    """What the report measures.

    Attributes:
        samples: prompts for sample generations (``sample_tokens`` each).
        baseline_sinks: S, the window + sinks baseline lets each query also see the first S tokens
            (attention sinks, beside its window of ``attention.window_size``); 0 leaves that baseline out.
        long_context: measure perplexity by token position on long windows (original, window-only,
            window + sinks, final model) and passkey accuracy by prompt length (original, final model).
        long_context_data / long_context_seq_len / long_context_windows: the long windows.
        passkey_lengths / passkey_trials: passkey prompt lengths (tokens) and random keys per (length, depth).
    """

    enabled: bool = True
    sample_tokens: int = 40
    samples: list[str] = field(default_factory=lambda: [
        "The state of the union is",
        "Call me Ishmael. Some years ago",
    ])
    baseline_sinks: int = 4
    long_context: bool = False
    long_context_data: str = "lolcats:moby_dick"
    long_context_seq_len: int = 8192
    long_context_windows: int = 2
    passkey_lengths: list[int] = field(default_factory=lambda: [1024, 2048, 4096, 8000])
    passkey_trials: int = 3

    def __post_init__(self) -> None:
        check_int("report.baseline_sinks", self.baseline_sinks, 0, " (0 leaves out the window + sinks baseline)")
        for name in ("long_context_seq_len", "long_context_windows", "passkey_trials"):
            check_int(f"report.{name}", getattr(self, name))
        if not self.long_context_data.strip():
            raise ValueError("report.long_context_data is empty; name a corpus, e.g. lolcats:moby_dick")
        if not self.passkey_lengths:
            raise ValueError("report.passkey_lengths is empty; give prompt lengths in tokens, e.g. [1024, 4096]")
        for i, n in enumerate(self.passkey_lengths):
            check_int(f"report.passkey_lengths[{i}]", n)
