"""Multi-needle retrieval: several key–value pairs hidden in natural text, one of them asked for.

Each prompt is the instruction, a stretch of a book (Moby-Dick by default) from a random sentence on, with
K sentences "The secret number for <word> is <5-digit number>." put at spread depths (distinct words
and numbers, drawn per prompt), and the question for one of the words. Scoring, the final window and the
cache bytes are those of :mod:`lolcats.eval.passkey`; the grid's columns are the asked needle's depth.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from torch import nn

from lolcats.eval.passkey import FINAL_WINDOW, layout, retrieval_accuracy

INTRO = ("Some secret numbers are hidden inside a long text. Find them and memorize them. "
         "I will quiz you about one of them.\n\n")
NEEDLE = "The secret number for {word} is {number}. "
QUESTION = "\n\nWhat is the secret number for {word}? The secret number for {word} is"
WORDS = ("red", "blue", "green", "yellow", "purple", "orange", "pink", "brown", "grey", "silver", "gold", "violet",
         "lion", "tiger", "horse", "rabbit", "eagle", "wolf", "bear", "fox", "otter", "zebra", "camel", "panda")
NEEDLES = 4
DATA = "lolcats:moby_dick"


def needle_depths(k: int) -> list[float]:
    """``k`` depths evenly spread over 0.1–0.9 (0.5 for one)."""
    if k < 1:
        raise ValueError(f"the number of needles must be at least 1, got {k}")
    return [0.5] if k == 1 else [round(0.1 + 0.8 * i / (k - 1), 4) for i in range(k)]


def sentences(text: str) -> list[str]:
    """The sentences of ``text``, each with the whitespace after it (an unfinished last one is dropped)."""
    return re.findall(r"[^.!?]*[.!?]+[\"'”’)\]]*\s*", text)


@dataclass(frozen=True)
class Haystack:
    """Natural text as sentences, with each sentence's token count (an estimate of its share of a prompt)."""

    pieces: tuple[str, ...]
    tokens: tuple[int, ...]

    @classmethod
    def from_text(cls, text: str, tokenizer) -> Haystack:
        pieces = tuple(s for s in sentences(text) if s.strip())
        if not pieces:
            raise ValueError("the haystack text has no sentences (text ending in '.', '!' or '?'); give prose")
        ids = tokenizer([p.rstrip() for p in pieces], add_special_tokens=False).input_ids
        return cls(pieces, tuple(max(len(i), 1) for i in ids))

    def stretch(self, start: int, tokens: int) -> tuple[list[str], list[int]]:
        """Sentences from ``start`` on (wrapping to the beginning) holding well over ``tokens`` tokens, and
        their token counts."""
        pieces: list[str] = []
        counts: list[int] = []
        i, total = start % len(self.pieces), 0
        while total < 1.25 * tokens + 64:
            pieces.append(self.pieces[i])
            counts.append(self.tokens[i])
            total += self.tokens[i]
            i = (i + 1) % len(self.pieces)
        return pieces, counts


def load_haystack(spec: str, tokenizer) -> Haystack:
    """The documents of a data spec (e.g. ``lolcats:moby_dick``, a folder of .txt) joined as one haystack."""
    from lolcats.data import load_documents

    return Haystack.from_text("\n\n".join(d.text for d in load_documents(spec)), tokenizer)


def draw_pairs(rng: random.Random, k: int) -> list[tuple[str, int]]:
    """``k`` (word, 5-digit number) pairs, words and numbers distinct."""
    if not 1 <= k <= len(WORDS):
        raise ValueError(f"the number of needles must be between 1 and {len(WORDS)} (one word each), got {k}")
    return list(zip(rng.sample(WORDS, k), rng.sample(range(10_000, 100_000), k), strict=True))


def build_prompt(tokenizer, length: int, haystack: Haystack, pairs: Sequence[tuple[str, int]],
                 depths: Sequence[float], asked: int, start: int = 0, final_window: int = 0) -> str:
    """A prompt of at most ``length`` tokens: the haystack from sentence ``start`` with pair i's needle after
    a fraction ``depths[i]`` of the text before the final window, asking for pair ``asked``."""
    if len(pairs) != len(depths):
        raise ValueError(f"{len(pairs)} pairs but {len(depths)} depths; give one depth per needle")
    if not 0 <= asked < len(pairs):
        raise ValueError(f"asked={asked} must index one of the {len(pairs)} pairs")
    pieces, counts = haystack.stretch(start, length)
    needles = [(d, NEEDLE.format(word=w, number=n)) for (w, n), d in zip(pairs, depths, strict=True)]
    return layout(tokenizer, length, pieces, needles, INTRO, QUESTION.format(word=pairs[asked][0]), final_window,
                  estimates=counts)


def multi_needle_accuracy(model: nn.Module, tokenizer, lengths: Sequence[int], depths: Sequence[float] | None = None,
                          trials: int = 3, seed: int = 0, data: str = DATA,
                          progress: Callable[[int], None] | None = None, final_window: int = FINAL_WINDOW) -> dict:
    """Multi-needle accuracy for every (length, asked needle's depth): every prompt hides a needle at each of
    ``depths`` (default :data:`NEEDLES` spread over 0.1–0.9) and asks for the one at the column's depth.

    Returns:
        :func:`lolcats.eval.passkey.retrieval_accuracy`'s result with ``task``, ``needles`` and ``data``; each
        run also records the asked ``word``, every needle and the haystack's first sentence (``text_start``).
    """
    depths = list(depths) if depths is not None else needle_depths(NEEDLES)
    draw_pairs(random.Random(0), len(depths))  # ValueError for too many needles, before the text is read
    haystack = load_haystack(data, tokenizer)

    def make(length: int, j: int, rng: random.Random) -> tuple[str, int, dict]:
        pairs = draw_pairs(rng, len(depths))
        start = rng.randrange(len(haystack.pieces))
        prompt = build_prompt(tokenizer, length, haystack, pairs, depths, j, start, final_window)
        needles = [{"word": w, "key": n, "depth": d} for (w, n), d in zip(pairs, depths, strict=True)]
        return prompt, pairs[j][1], {"word": pairs[j][0], "needles": needles, "text_start": start}

    result = retrieval_accuracy(model, tokenizer, lengths, depths, trials, make, seed, final_window, progress)
    return {"task": "multi-needle", "needles": len(depths), "data": data, **result}
