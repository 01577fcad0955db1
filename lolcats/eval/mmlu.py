"""Few-shot MMLU scored by next-token log-probabilities of " A" / " B" / " C" / " D" (docs/evaluation.md).

The prompt is the standard one (lm-eval's ``mmlu`` task): "The following are multiple choice questions
(with answers) about {subject}.\\n\\n", then each exemplar as "question\\nA. …\\nB. …\\nC. …\\nD. …\\nAnswer: X"
separated by blank lines, then the question ending in "Answer:". Prompts are tokenized whole, exactly as
the uncached path and lm-eval see them.

Speed: the exemplars are the same for every question of a subject, so the tokens all its prompts share
are run once; so is the start of a group of questions that begin alike (several questions on one passage
in the history subjects, the fixed stem of moral scenarios: :func:`stem_groups`), run once on top of them.
Each batch of questions then reads what it shares without copying (:mod:`lolcats.eval.shared_prefix`):
linearized layers their constant-size recurrent state (batch 1, read but never advanced, in one dense
pass: :class:`~lolcats.eval.shared_prefix.SharedPrefixState`), softmax layers the prefix's keys/values in
place (one attention call per batch). Questions of a batch are right-padded,
which no real token can see (causal attention), and the output head — and the last layer's MLP before it —
read each row at its own last token only. ``cached=False`` is the plain path: every prompt alone, from scratch.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from itertools import pairwise
from typing import NamedTuple

import torch
from torch import Tensor, nn
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from lolcats.attention.cache import LolcatsCacheLayer
from lolcats.eval.mmlu_data import LETTERS, Item, MMLUData
from lolcats.eval.shared_prefix import SharedPrefixState, shared_prefix_attention, supports_shared_prefix
from lolcats.generate import pad_token_id

# Questions sharing at least this many tokens past the exemplars share their run too (see stem_groups).
MIN_STEM = 32
HEADER = "The following are multiple choice questions (with answers) about {subject}.\n\n"


def format_item(item: Item, with_answer: bool) -> str:
    text = item.question.strip() + "".join(f"\n{x}. {c}" for x, c in zip(LETTERS, item.choices, strict=True))
    text += "\nAnswer:"
    return text + f" {LETTERS[item.answer]}\n\n" if with_answer else text


def build_prompt(subject: str, exemplars: list[Item], item: Item) -> str:
    """The full prompt for ``item``: header, solved exemplars, the question ending in "Answer:"."""
    return HEADER.format(subject=subject) + "".join(format_item(x, True) for x in exemplars) + format_item(item, False)


def letter_token_ids(tokenizer) -> list[int]:
    """Token ids of " A".." D"; each must be one token (it is for Llama/SmolLM2/Mistral/Qwen tokenizers)."""
    ids = []
    for letter in LETTERS:
        enc = tokenizer(f"Answer: {letter}", add_special_tokens=False).input_ids
        base = tokenizer("Answer:", add_special_tokens=False).input_ids
        if enc[: len(base)] != base or len(enc) != len(base) + 1:
            raise ValueError(f"this tokenizer does not encode ' {letter}' after 'Answer:' as one token; "
                             "next-token MMLU scoring needs single-token answer letters")
        ids.append(enc[-1])
    return ids


@dataclass
class SubjectPrompts:
    """Token ids of one subject's prompts: the shared start and each question's rest."""

    shared: list[int]
    rests: list[list[int]]


def tokenize_subject(tokenizer, subject: str, exemplars: list[Item], items: list[Item]) -> SubjectPrompts:
    """Tokenize every prompt whole and split off the tokens they all share (at least one token is left
    to each question, so its last position is always computed)."""
    full = [tokenizer(build_prompt(subject, exemplars, it), add_special_tokens=False).input_ids for it in items]
    head = tokenizer(HEADER.format(subject=subject) + "".join(format_item(x, True) for x in exemplars),
                     add_special_tokens=False).input_ids
    n = min(len(head), *(len(f) - 1 for f in full))
    for f in full:
        while n > 0 and f[:n] != head[:n]:
            n -= 1
    return SubjectPrompts(head[:n], [f[n:] for f in full])


@contextmanager
def _head_reads(model: nn.Module, last: Tensor, last_mlp: bool = False) -> Iterator[bool]:
    """While inside, the output head sees only each row's hidden state at ``last[b]`` (a pre-hook on
    ``get_output_embeddings()``), so a batch costs B rows of logits, not B × T. Yields False for a model
    without an output-embedding module (the caller then keeps the positions itself).

    With ``last_mlp`` the last decoder layer's MLP also runs on those tokens only: its (B, 1, D) output is
    broadcast over the row by the residual add that follows it, which leaves position ``last[b]`` — the only
    one the head reads — exact (nothing is done for a model without such an MLP)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if not isinstance(head, nn.Module):
        yield False
        return
    rows = torch.arange(last.shape[0], device=last.device)

    def pick(module: nn.Module, args: tuple) -> tuple:
        return (args[0][rows, last][:, None], *args[1:])

    def check(module: nn.Module, args: tuple, out: object) -> None:
        if not isinstance(out, Tensor) or out.shape[:2] != (last.shape[0], 1):
            raise RuntimeError(f"expected the last MLP to return (B, 1, D), got {getattr(out, 'shape', type(out))}")

    handles = [head.register_forward_pre_hook(pick)]
    mlp = _last_mlp(model) if last_mlp else None
    if mlp is not None:
        handles += [mlp.register_forward_pre_hook(pick), mlp.register_forward_hook(check)]
    try:
        yield True
    finally:
        for handle in handles:
            handle.remove()


def _last_mlp(model: nn.Module) -> nn.Module | None:
    """The MLP of the model's last decoder layer, where it has one (``get_decoder().layers[-1].mlp``)."""
    layers = getattr(model.get_decoder(), "layers", None) if hasattr(model, "get_decoder") else None
    mlp = getattr(layers[-1], "mlp", None) if isinstance(layers, nn.ModuleList) and len(layers) else None
    return mlp if isinstance(mlp, nn.Module) else None


@torch.no_grad()
def _last_logprobs(model: nn.Module, ids: Tensor, last: Tensor, letters: Tensor, cache: object | None,
                   last_only: bool = False, **extra: object) -> Tensor:
    """Log-probabilities of the letters after each row's token ``last[b]``: (B, 4). ``last_only`` also runs
    the last layer's MLP on those tokens only (see :func:`_head_reads`)."""
    kwargs = {"past_key_values": cache, "use_cache": True} if cache is not None else {"use_cache": False}
    with _head_reads(model, last, last_mlp=last_only) as picked:
        if picked:
            logits = model(input_ids=ids, logits_to_keep=0, **kwargs, **extra).logits  # (B, 1, V)
            if logits.shape[:2] != (ids.shape[0], 1):
                raise RuntimeError(f"expected one logit row per sequence, got {tuple(logits.shape)}")
            picked = logits[:, 0].float()
        else:
            keep = torch.unique(last)
            logits = model(input_ids=ids, logits_to_keep=keep, **kwargs, **extra).logits.float()
            picked = logits[torch.arange(ids.shape[0], device=ids.device), torch.searchsorted(keep, last)]
    return torch.log_softmax(picked, dim=-1)[:, letters]


def _batch_cache(prefix: DynamicCache) -> DynamicCache | None:
    """The cache a batch of questions starts from: linearized layers read the prefix's state (batch 1, shared
    by every row, never advanced); softmax layers start empty, their prefix keys/values being read in place
    by the shared-prefix attention. None when the model has no linearized layer."""
    layers = [SharedPrefixState(x.state) if isinstance(x, LolcatsCacheLayer) else DynamicLayer()
              for x in prefix.layers]
    if not any(isinstance(x, SharedPrefixState) for x in layers):
        return None
    cache = DynamicCache()
    cache.layers = layers
    return cache


def stem_groups(rests: list[list[int]], min_stem: int = MIN_STEM) -> list[tuple[int, list[int]]]:
    """The questions (token lists after the shared start) grouped by a start of their own: ``(stem, indices)``
    for each group of two or more questions whose first ``stem`` ≥ ``min_stem`` tokens are the same (each
    keeps at least one token past it), then ``(0, indices)`` of the questions in no group. Questions are
    taken in token order, so those that start alike are neighbours; a group is a run of neighbours sharing
    ``min_stem`` tokens or more, its stem what the whole run shares."""
    order = sorted(range(len(rests)), key=lambda i: rests[i])

    def common(a: list[int], b: list[int]) -> int:
        n, i = min(len(a), len(b)) - 1, 0
        while i < n and a[i] == b[i]:
            i += 1
        return i

    runs: list[list[int]] = []
    for i in order:
        if runs and common(rests[runs[-1][-1]], rests[i]) >= min_stem:
            runs[-1].append(i)
        else:
            runs.append([i])
    groups, alone = [], []
    for run in runs:
        if len(run) == 1:
            alone += run
        else:  # the run's neighbours share >= min_stem tokens, so the whole run shares min() of those
            groups.append((min(common(rests[a], rests[b]) for a, b in pairwise(run)), run))
    return groups + ([(0, alone)] if alone else [])


class StemBatches(NamedTuple):
    """One group of :func:`batch_plan`: the tokens its questions share past the subject's shared start (0: none
    beyond it), and its batches of question indices."""

    stem: int
    batches: list[list[int]]


def batch_plan(rests: list[list[int]], batch_size: int, min_stem: int = MIN_STEM) -> list[StemBatches]:
    """How the cached path runs one subject's questions (token lists after the shared start): by
    :func:`stem_groups`, each group's stem run once, then its questions shortest first (similar lengths
    batch together: less padding) in batches of at most ``batch_size``."""
    plan = []
    for stem, group in stem_groups(rests, min_stem):
        order = sorted(group, key=lambda i: len(rests[i]))
        plan.append(StemBatches(stem, [order[i : i + batch_size] for i in range(0, len(order), batch_size)]))
    return plan


def tokens_run(prompts: SubjectPrompts, cached: bool = True) -> int:
    """Tokens :func:`score_subject` runs through the model for one subject (padding not counted)."""
    if not cached:
        return sum(len(prompts.shared) + len(r) for r in prompts.rests)
    return len(prompts.shared) + sum(stem + sum(len(prompts.rests[i]) - stem for i in idx)
                                     for stem, idx in stem_groups(prompts.rests))


def _fork(cache: DynamicCache) -> DynamicCache:
    """A batch-1 cache that starts where ``cache`` ends and can be extended without changing it: the layers'
    tensors are shared, not copied (a ``DynamicLayer`` appends by concatenation, a linearized layer's
    extension makes a new state; any other kind of layer is deep-copied)."""
    new = copy.copy(cache)
    new.layers = [copy.copy(x) if type(x) in (DynamicLayer, LolcatsCacheLayer) else copy.deepcopy(x)
                  for x in cache.layers]
    return new


def _extend(model: nn.Module, cache: DynamicCache | None, tokens: list[int]) -> DynamicCache:
    """A new batch-1 cache: ``cache`` (None: empty) with ``tokens`` run on top; ``cache`` is left as it was."""
    device = next(model.parameters()).device
    new = DynamicCache() if cache is None else _fork(cache)
    model(input_ids=torch.tensor([tokens], device=device), past_key_values=new, use_cache=True, logits_to_keep=1)
    return new


@torch.no_grad()
def score_subject(model: nn.Module, prompts: SubjectPrompts, letters: list[int], *, batch_size: int = 4,
                  cached: bool = True, pad_id: int = 0,
                  progress: Callable[[int], None] | None = None) -> Tensor:
    """(n, 4) letter log-probabilities for one subject's questions."""
    device = next(model.parameters()).device
    letters_t = torch.tensor(letters, device=device)
    n = len(prompts.rests)
    out = torch.empty(n, 4)
    if not cached:
        for i, rest in enumerate(prompts.rests):
            ids = torch.tensor([prompts.shared + rest], device=device)
            out[i] = _last_logprobs(model, ids, torch.tensor([ids.shape[1] - 1], device=device), letters_t, None)[0]
            if progress:
                progress(1)
        return out
    head = _extend(model, None, prompts.shared) if prompts.shared else None
    in_place = supports_shared_prefix(model, len(prompts.shared) + max(len(r) for r in prompts.rests))
    for stem, batches in batch_plan(prompts.rests, batch_size):
        # questions on one passage (or with one fixed stem) run it once, on top of the exemplars
        prefix = _extend(model, head, prompts.rests[batches[0][0]][:stem]) if stem else head
        p = len(prompts.shared) + stem
        for idx in batches:
            rests = [prompts.rests[i][stem:] for i in idx]
            width = max(len(r) for r in rests)
            ids = torch.full((len(idx), width), pad_id, dtype=torch.long, device=device)
            for row, r in enumerate(rests):
                ids[row, : len(r)] = torch.tensor(r)
            last = torch.tensor([len(r) - 1 for r in rests], device=device)
            if prefix is not None and in_place:
                cache = _batch_cache(prefix)
                positions = torch.arange(p, p + width, device=device).expand(len(idx), -1)
                with shared_prefix_attention(model):
                    out[idx] = _last_logprobs(model, ids, last, letters_t, cache, last_only=True,
                                              position_ids=positions, lolcats_prefix=prefix).cpu()
            else:
                cache = DynamicCache()
                if prefix is not None:
                    cache = copy.deepcopy(prefix)
                    cache.batch_repeat_interleave(len(idx))
                out[idx] = _last_logprobs(model, ids, last, letters_t, cache, last_only=True).cpu()
            if progress:
                progress(len(idx))
    return out


def evaluate_mmlu(model: nn.Module, tokenizer, data: MMLUData, *, shots: int = 5, batch_size: int = 4,
                  cached: bool = True, progress: Callable[[int], None] | None = None) -> dict:
    """Score every item of ``data``; returns the result record (see :func:`summary_table`).

    Ties between letters go to the earliest letter.
    """
    if not 0 <= shots <= 5:
        raise ValueError(f"--shots must be between 0 and 5, got {shots}")
    if batch_size < 1:
        raise ValueError(f"--batch-size must be at least 1, got {batch_size}")
    letters = letter_token_ids(tokenizer)
    pad_id = pad_token_id(tokenizer)
    model.eval()
    subjects, predictions = {}, []
    tokens = 0
    t0 = time.perf_counter()
    for subject in data.subjects:
        items = data.test[subject]
        exemplars = data.dev[subject][:shots]
        if len(exemplars) < shots:
            raise ValueError(f"subject {subject!r} has only {len(exemplars)} exemplars for --shots {shots}")
        prompts = tokenize_subject(tokenizer, subject, exemplars, items)
        tokens += tokens_run(prompts, cached)
        logprobs = score_subject(model, prompts, letters, batch_size=batch_size, cached=cached, pad_id=pad_id,
                                 progress=progress)
        pred = logprobs.argmax(-1)  # first maximum: ties go to the earliest letter
        correct = sum(int(p) == it.answer for p, it in zip(pred.tolist(), items, strict=True))
        subjects[subject] = {"accuracy": correct / len(items), "correct": correct, "items": len(items),
                             "prompt_tokens": len(prompts.shared)}
        for i, (it, lp) in enumerate(zip(items, logprobs.tolist(), strict=True)):
            predictions.append({"subject": subject, "index": i, "answer": LETTERS[it.answer],
                                "prediction": LETTERS[int(pred[i])], "logprobs": [round(x, 6) for x in lp]})
    seconds = time.perf_counter() - t0
    total = sum(s["items"] for s in subjects.values())
    return {
        "micro_accuracy": sum(s["correct"] for s in subjects.values()) / total,
        "macro_accuracy": sum(s["accuracy"] for s in subjects.values()) / len(subjects),
        "items": total,
        "subjects": subjects,
        "shots": shots,
        "cached": cached,
        "batch_size": batch_size,
        "seconds": seconds,
        "tokens_run": tokens,
        "data": {"source": data.source, "sha256": data.sha256, "exemplar_rule": data.exemplar_rule,
                 "notes": data.notes},
        "predictions": predictions,
    }


def summary_table(result: dict) -> str:
    """Markdown table: one row per subject, then micro and macro averages."""
    lines = ["| subject | items | accuracy |", "|---|---:|---:|"]
    for name, s in sorted(result["subjects"].items()):
        lines.append(f"| {name} | {s['items']} | {100 * s['accuracy']:.1f} |")
    lines.append(f"| **micro average** | {result['items']} | {100 * result['micro_accuracy']:.2f} |")
    lines.append(f"| **macro average** | {len(result['subjects'])} subjects | {100 * result['macro_accuracy']:.2f} |")
    return "\n".join(lines)
