"""Retrieval by prompt length and needle depth: the passkey task, and the scoring both retrieval tasks share.

Passkey (Mohtashami & Jaggi 2023's format): a prompt of about ``length`` tokens is the instruction,
repeated filler sentences with the needle sentence put after a fraction ``depth`` of them, and the
question. The multi-needle task (:mod:`lolcats.eval.needles`) hides several key–value pairs in natural
text instead. Either way the model decodes greedily and succeeds when the first number it writes is the
key. With a final window of F tokens the depth is a fraction of the filler *before* the prompt's last F
tokens, so a needle is never read by a linearized model's softmax window from the question: the
answer has to come from the linear state (or a sparse cache).

Each result also holds the bytes of the model's cache for one sequence after the prompt's prefill, every
tensor counted (linear state, window, sinks, sparse cache, softmax layers' keys/values), by length.
"""

from __future__ import annotations

import bisect
import itertools
import random
import re
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from lolcats.attention import LolcatsAttention, cache_nbytes, find_decoder_layers
from lolcats.generate import position_limit

INTRO = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
         "I will quiz you about the important information there.\n\n")
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key. "
QUESTION = "\n\nWhat is the pass key? The pass key is"

DEPTHS = (0.1, 0.3, 0.5, 0.7, 0.9)
LENGTHS = (1024, 2048, 4096, 8000)
FINAL_WINDOW = 128  # tokens at the end of a prompt no needle enters: 2 x 64, the terraced window of w = 64
MAX_NEW_TOKENS = 8
ANSWER_ROOM = 12  # positions a prompt leaves free for the answer

MakePrompt = Callable[[int, int, random.Random], tuple[str, int, dict]]
"""``(length, depth index, rng) -> (prompt, key, details for the run record)``."""


def default_lengths(limit: int | None) -> list[int]:
    """:data:`LENGTHS` that fit below the position limit with the answer, plus the longest that does when
    8,000 does not (e.g. ``[500]`` for a 512-position model)."""
    if limit is None:
        return list(LENGTHS)
    top = limit - ANSWER_ROOM
    fit = [n for n in LENGTHS if n <= top]
    return fit if len(fit) == len(LENGTHS) or top < 1 else fit + [top]


def _count(tokenizer, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False).input_ids)


def _largest(fits: Callable[[int], bool], start: int, top: int) -> int:
    """The largest n in [1, top] with ``fits(n)`` (monotone), searched outward from ``start``; 0 if none."""
    if fits(start):
        lo, step = start, 1
        while lo + step <= top and fits(lo + step):
            lo, step = lo + step, 2 * step
        hi = min(lo + step, top + 1)
    else:
        hi, step = start, 1
        while hi - step >= 1 and not fits(hi - step):
            hi, step = hi - step, 2 * step
        lo = max(hi - step, 0)
    while hi - lo > 1:  # fits(lo) or lo == 0; not fits(hi) or hi == top + 1
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


def layout(tokenizer, length: int, pieces: Sequence[str], needles: Sequence[tuple[float, str]], head: str,
           question: str, final_window: int = 0, estimates: Sequence[float] | None = None) -> str:
    """``head`` + filler with needles + ``question`` in at most ``length`` tokens, with as much filler as fits.

    The filler is ``pieces[:n]``. The last pieces plus the question make the final window (at least
    ``final_window`` tokens); needle i goes after a fraction ``depth_i`` of the pieces before it, so at
    least ``final_window`` tokens follow every needle.

    Args:
        pieces: filler sentences in order (each with its trailing space), more than the prompt needs.
        needles: ``(depth, sentence)`` pairs, depth in [0, 1].
        estimates: tokens per piece (counted one by one when omitted); the exact count is found by search.

    Raises:
        ValueError: a depth outside [0, 1], or a length too short for the fixed text and the final window.
    """
    for depth, _ in needles:
        if not 0.0 <= depth <= 1.0:
            raise ValueError(f"depth must be between 0 and 1, got {depth}")
    fixed = _count(tokenizer, head + "".join(text for _, text in needles) + question)
    est = list(estimates) if estimates is not None else [_count(tokenizer, p.rstrip()) for p in pieces]
    start = bisect.bisect_right(list(itertools.accumulate(est)), length - fixed)
    if start < 1:
        raise ValueError(f"length {length} leaves no room for filler (the fixed text takes {fixed} tokens)")
    order = sorted(range(len(needles)), key=lambda i: needles[i][0])
    q_tokens = _count(tokenizer, question)

    def compose(n: int) -> tuple[str, bool]:
        """The prompt with ``pieces[:n]``, and whether every needle is out of the final window."""
        tail, k = q_tokens, 0
        while tail < final_window and k < n:
            k += 1
            tail += est[n - k]
        while True:
            usable, parts, prev = n - k, [head], 0
            for i in order:
                pos = round(needles[i][0] * usable)
                parts += [*pieces[prev:pos], needles[i][1]]
                prev = pos
            after = "".join(pieces[prev:n]) + question
            ok = usable >= 1 and (not final_window or not needles or _count(tokenizer, after) >= final_window)
            if ok or k >= n:
                return "".join(parts) + after, ok
            k += 1

    n = _largest(lambda n: _count(tokenizer, compose(n)[0]) <= length, min(start, len(pieces)), len(pieces))
    if n == 0:
        raise ValueError(f"cannot fit a retrieval prompt in {length} tokens")
    text, ok = compose(n)
    if not ok:
        per = sum(est[:n]) / n
        need = fixed + max(final_window, q_tokens) + round(3 * per)
        raise ValueError(f"length {length} is too short to keep a needle out of the prompt's final window of "
                         f"{final_window} tokens (the instruction, needles and question take {fixed}); give lengths "
                         f"of at least {need}, or a smaller --final-window")
    return text


def build_prompt(tokenizer, length: int, depth: float, key: int, final_window: int = 0) -> str:
    """A passkey prompt of at most ``length`` tokens with the needle after ``depth`` (0..1) of the filler that
    lies before the final ``final_window`` tokens."""
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be between 0 and 1, got {depth}")
    per = max(_count(tokenizer, FILLER * 8) / 8, 1.0)
    reps = max(int(length / per) + 8, 1)
    return layout(tokenizer, length, [FILLER] * reps, [(depth, NEEDLE.format(key=key))], INTRO, QUESTION,
                  final_window, estimates=[per] * reps)


def first_number(text: str) -> int | None:
    m = re.search(r"\d+", text)
    return int(m.group()) if m else None


def check_model(model: nn.Module, lengths: Sequence[int], final_window: int) -> None:
    """ValueError when a length with the answer is past the model's positions, or when a linearized layer's
    softmax window would see a needle that lies outside the final window."""
    limit = position_limit(model)
    for length in lengths:
        if limit is not None and length + ANSWER_ROOM > limit:
            raise ValueError(f"length {length} plus the answer is past the model's position limit of {limit}; "
                             f"use shorter --lengths (at most {limit - ANSWER_ROOM})")
    slots = max((m.spec.slots for m in model.modules() if isinstance(m, LolcatsAttention)), default=0)
    if final_window and slots > final_window:
        raise ValueError(f"the model's softmax window keeps the last {slots} tokens exact, more than the final "
                         f"window of {final_window} that no needle enters; give --final-window {slots} or more")


@torch.no_grad()
def greedy_answer(model: nn.Module, ids: Tensor, max_new_tokens: int, stop: set[int]) -> tuple[list[int], int]:
    """Greedy continuation of ``ids`` (1, T) up to a stop token, and the bytes of the model's cache for the
    sequence after the prompt's prefill (every tensor it holds, whatever the layer kind)."""
    out = model(input_ids=ids, use_cache=True, logits_to_keep=1)
    cache = out.past_key_values
    nbytes = cache_nbytes(cache) // ids.shape[0]
    tokens: list[int] = []
    while True:
        token = out.logits[:, -1].argmax(-1, keepdim=True)  # (1, 1)
        if int(token) in stop:
            break
        tokens.append(int(token))
        if len(tokens) == max_new_tokens:
            break
        out = model(input_ids=token, past_key_values=cache, use_cache=True)
    return tokens, nbytes


def answer(model: nn.Module, tokenizer, prompt: str, stop: set[int]) -> tuple[str, int, int]:
    """The model's greedy answer to ``prompt`` (text, at most :data:`MAX_NEW_TOKENS` tokens), the prompt's
    tokens, and the cache bytes after its prefill."""
    ids = tokenizer(prompt, return_tensors="pt").input_ids.to(next(model.parameters()).device)
    tokens, nbytes = greedy_answer(model, ids, MAX_NEW_TOKENS, stop)
    return tokenizer.decode(tokens, skip_special_tokens=True), ids.shape[1], nbytes


def softmax_kv_bytes(model: nn.Module, tokens: int) -> int:
    """Bytes of the keys and values full softmax attention in every decoder layer keeps for ``tokens`` tokens
    (the original model's cache, for comparison)."""
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    heads = cfg.num_attention_heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    itemsize = torch.empty((), dtype=model.dtype).element_size()
    return len(find_decoder_layers(model)) * 2 * kv_heads * head_dim * tokens * itemsize


def _stop_ids(model: nn.Module, tokenizer) -> set[int]:
    ids = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids = ids if isinstance(ids, (list, tuple)) else [ids]
    return {int(i) for i in [*ids, tokenizer.eos_token_id] if i is not None}


@torch.no_grad()
def retrieval_accuracy(model: nn.Module, tokenizer, lengths: Sequence[int], depths: Sequence[float], trials: int,
                       make_prompt: MakePrompt, seed: int = 0, final_window: int = FINAL_WINDOW,
                       progress: Callable[[int], None] | None = None) -> dict:
    """Exact-match accuracy for every (length, depth) and cache bytes per sequence by length.

    Every prompt is built (and a too-short length refused) before the first is run.

    Returns:
        ``lengths``, ``depths``, ``trials``, ``final_window``, ``grid`` (accuracy per depth per length),
        ``by_length``, ``accuracy``, ``prompt_tokens``, ``cache_bytes`` and ``softmax_kv_bytes`` (by length,
        the largest over its prompts) and ``runs`` (one record per prompt).
    """
    check_model(model, lengths, final_window)
    rng = random.Random(seed)
    prompts = [[[make_prompt(length, j, rng) for _ in range(trials)] for j in range(len(depths))] for length in lengths]
    stop = _stop_ids(model, tokenizer)
    model.eval()
    grid, runs = [], []
    for length, row in zip(lengths, prompts, strict=True):
        cells = []
        for depth, cell in zip(depths, row, strict=True):
            hits = 0
            for prompt, key, details in cell:
                text, n_tokens, nbytes = answer(model, tokenizer, prompt, stop)
                ok = first_number(text) == key
                hits += ok
                runs.append({"length": length, "tokens": n_tokens, "depth": depth, "key": key, **details,
                             "answer": text, "correct": ok, "cache_bytes": nbytes})
                if progress:
                    progress(1)
            cells.append(hits / trials)
        grid.append(cells)
    tokens = {str(n): max(r["tokens"] for r in runs if r["length"] == n) for n in lengths}
    return {"lengths": list(lengths), "depths": list(depths), "trials": trials, "final_window": final_window,
            "grid": grid, "by_length": {str(n): sum(row) / len(row) for n, row in zip(lengths, grid, strict=True)},
            "accuracy": sum(r["correct"] for r in runs) / len(runs), "prompt_tokens": tokens,
            "cache_bytes": {str(n): max(r["cache_bytes"] for r in runs if r["length"] == n) for n in lengths},
            "softmax_kv_bytes": {n: softmax_kv_bytes(model, t) for n, t in tokens.items()}, "runs": runs}


def passkey_accuracy(model: nn.Module, tokenizer, lengths: Sequence[int], depths: Sequence[float] = DEPTHS,
                     trials: int = 2, seed: int = 0, progress: Callable[[int], None] | None = None,
                     final_window: int = FINAL_WINDOW) -> dict:
    """Passkey accuracy for every (length, depth), a random 5-digit key per prompt; see :func:`retrieval_accuracy`."""
    def make(length: int, j: int, rng: random.Random) -> tuple[str, int, dict]:
        key = rng.randint(10_000, 99_999)
        return build_prompt(tokenizer, length, depths[j], key, final_window), key, {}

    result = retrieval_accuracy(model, tokenizer, lengths, depths, trials, make, seed, final_window, progress)
    return {"task": "passkey", **result}


def table(result: dict) -> str:
    """Markdown: accuracy by length (rows) and depth, per length overall, and cache bytes per sequence."""
    label = "asked depth" if result.get("task") == "multi-needle" else "depth"
    depths = result["depths"]
    lines = [f"| length \\ {label} | " + " | ".join(f"{d:.2g}" for d in depths)
             + " | all | prompt tokens | cache bytes | softmax KV bytes |",
             "|---" + "|---:" * (len(depths) + 4) + "|"]
    for length, row in zip(result["lengths"], result["grid"], strict=True):
        n = str(length)
        lines.append(f"| {length} | " + " | ".join(f"{100 * a:.0f}%" for a in row)
                     + f" | {100 * result['by_length'][n]:.0f}% | {result['prompt_tokens'][n]} "
                     f"| {result['cache_bytes'][n]:,} | {result['softmax_kv_bytes'][n]:,} |")
    return "\n".join(lines)


def heatmap(result: dict, path, title: str = "passkey retrieval") -> None:
    """PNG heat map: accuracy by prompt length (rows) and needle depth (columns)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(1.2 * len(result["depths"]) + 2, 0.6 * len(result["lengths"]) + 1.5))
    im = ax.imshow(result["grid"], vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
    ax.set_xticks(range(len(result["depths"])), [f"{d:.2g}" for d in result["depths"]])
    ax.set_yticks(range(len(result["lengths"])), [str(n) for n in result["lengths"]])
    what = "asked needle's depth" if result.get("task") == "multi-needle" else "needle depth"
    ax.set_xlabel(f"{what} (fraction of the filler before the final window)")
    ax.set_ylabel("prompt tokens")
    for i, row in enumerate(result["grid"]):
        for j, a in enumerate(row):
            ax.text(j, i, f"{100 * a:.0f}", ha="center", va="center", fontsize=8)
    fig.colorbar(im, ax=ax, label="accuracy")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
