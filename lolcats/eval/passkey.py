"""Passkey retrieval: a random number hidden at a given depth of filler text, asked for at the end.

The long-context test linearized models are bought for (Mohtashami & Jaggi 2023's format). A prompt
of about ``length`` tokens is the instruction, repeated filler sentences with the needle sentence put
after a fraction ``depth`` of them, and the question; the model decodes greedily and succeeds when
the first number it writes is the key.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Sequence

import torch
from torch import nn

from lolcats.generate import pad_token_id, position_limit

INTRO = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
         "I will quiz you about the important information there.\n\n")
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key. "
QUESTION = "\n\nWhat is the pass key? The pass key is"


def build_prompt(tokenizer, length: int, depth: float, key: int) -> str:
    """A prompt of at most ``length`` tokens with the needle after ``depth`` (0..1) of the filler."""
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be between 0 and 1, got {depth}")

    def n_tokens(text: str) -> int:
        return len(tokenizer(text, add_special_tokens=False).input_ids)

    fixed = n_tokens(INTRO + NEEDLE.format(key=key) + QUESTION)
    per = max(n_tokens(FILLER * 8) / 8, 1.0)
    reps = int((length - fixed) // per)
    if reps < 1:
        raise ValueError(f"length {length} leaves no room for filler (the fixed text takes {fixed} tokens)")
    while reps > 0:
        before = round(depth * reps)
        text = INTRO + FILLER * before + NEEDLE.format(key=key) + FILLER * (reps - before) + QUESTION
        if n_tokens(text) <= length:
            return text
        reps -= 1
    raise ValueError(f"cannot fit a passkey prompt in {length} tokens")


def first_number(text: str) -> int | None:
    m = re.search(r"\d+", text)
    return int(m.group()) if m else None


@torch.no_grad()
def passkey_accuracy(model: nn.Module, tokenizer, lengths: Sequence[int], depths: Sequence[float],
                     trials: int = 2, seed: int = 0,
                     progress: Callable[[int], None] | None = None) -> dict:
    """Accuracy for every (length, depth): ``{"grid": [[acc per depth] per length], "runs": [...]}``."""
    limit = position_limit(model)
    rng = random.Random(seed)
    device = next(model.parameters()).device
    model.eval()
    grid, runs = [], []
    for length in lengths:
        if limit is not None and length + 12 > limit:
            raise ValueError(f"length {length} plus the answer is past the model's position limit of {limit}; "
                             "use shorter --lengths")
        row = []
        for depth in depths:
            hits = 0
            for _ in range(trials):
                key = rng.randint(10_000, 99_999)
                ids = tokenizer(build_prompt(tokenizer, length, depth, key), return_tensors="pt").input_ids.to(device)
                out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False,
                                     pad_token_id=pad_token_id(tokenizer))
                answer = tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
                ok = first_number(answer) == key
                hits += ok
                runs.append({"length": length, "tokens": ids.shape[1], "depth": depth, "key": key,
                             "answer": answer, "correct": ok})
                if progress:
                    progress(1)
            row.append(hits / trials)
        grid.append(row)
    return {"lengths": list(lengths), "depths": list(depths), "trials": trials, "grid": grid, "runs": runs,
            "accuracy": sum(r["correct"] for r in runs) / len(runs)}


def table(result: dict) -> str:
    head = "| length \\ depth | " + " | ".join(f"{d:g}" for d in result["depths"]) + " |"
    lines = [head, "|---" * (len(result["depths"]) + 1) + "|"]
    for length, row in zip(result["lengths"], result["grid"], strict=True):
        lines.append(f"| {length} | " + " | ".join(f"{100 * a:.0f}%" for a in row) + " |")
    return "\n".join(lines)


def heatmap(result: dict, path, title: str = "passkey retrieval") -> None:
    """PNG heat map: accuracy by prompt length (rows) and needle depth (columns)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(1.2 * len(result["depths"]) + 2, 0.6 * len(result["lengths"]) + 1.5))
    im = ax.imshow(result["grid"], vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
    ax.set_xticks(range(len(result["depths"])), [f"{d:g}" for d in result["depths"]])
    ax.set_yticks(range(len(result["lengths"])), [str(n) for n in result["lengths"]])
    ax.set_xlabel("needle depth (fraction of the filler before it)")
    ax.set_ylabel("prompt tokens")
    for i, row in enumerate(result["grid"]):
        for j, a in enumerate(row):
            ax.text(j, i, f"{100 * a:.0f}", ha="center", va="center", fontsize=8)
    fig.colorbar(im, ax=ax, label="accuracy")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
