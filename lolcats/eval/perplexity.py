"""Held-out perplexity over fixed-length windows."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor, nn

from lolcats.data import Chunks


def sliding_window_mask(t: int, window: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """(1, 1, T, T) additive mask: each query sees only its last ``window`` keys (itself included)."""
    i = torch.arange(t, device=device)
    allowed = (i[None, :] <= i[:, None]) & (i[:, None] - i[None, :] < window)
    mask = torch.zeros(t, t, dtype=dtype, device=device)
    return mask.masked_fill(~allowed, torch.finfo(dtype).min)[None, None]


@torch.no_grad()
def window_nll(model: nn.Module, chunks: Chunks, attention_window: int | None = None,
               progress: Callable[[int], object] | None = None) -> tuple[float, int]:
    """Summed next-token NLL and the number of predicted tokens over ``chunks``.

    Args:
        attention_window: evaluate a softmax model with only a sliding window of this many keys (the
            window-only baseline); None for the model as it is.
        progress: called with the number of windows done after each one.
    """
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for i in range(len(chunks)):
        ids, labels = (x.to(device) for x in chunks[i])
        kwargs = {}
        if attention_window is not None:
            dtype = next(model.parameters()).dtype
            kwargs["attention_mask"] = sliding_window_mask(ids.shape[1], attention_window, dtype, device)
        logits = model(input_ids=ids, use_cache=False, **kwargs).logits.float()
        target = labels[:, 1:]
        nll = nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), target.flatten(), ignore_index=-100,
                                          reduction="sum")
        total += nll.item()
        count += int((target != -100).sum())
        if progress is not None:
            progress(i + 1)
    return total, count


def perplexity(model: nn.Module, chunks: Chunks, attention_window: int | None = None,
               progress: Callable[[int], object] | None = None) -> float:
    total, count = window_nll(model, chunks, attention_window, progress)
    return math.exp(total / max(count, 1))


def gap_closure(ppl_baseline: float, ppl_model: float, ppl_original: float) -> float:
    """Log-perplexity gap closure of a model from a baseline toward the original (docs/design.md, "Gap closure")."""
    denom = math.log(ppl_baseline) - math.log(ppl_original)
    return (math.log(ppl_baseline) - math.log(ppl_model)) / denom if denom != 0 else float("nan")


POSITION_BUCKETS = ((0, 512), (512, 1024), (1024, 2048), (2048, 4096), (4096, 8192))


def bucket_name(lo: int, hi: int) -> str:
    def k(x: int) -> str:
        return f"{x // 1024}k" if x >= 1024 and x % 1024 == 0 else str(x)

    return f"{k(lo)}–{k(hi)}"


def _final_hidden(model: nn.Module, ids: Tensor) -> Tensor:
    """(B, T, H) hidden states entering the LM head (after the final norm)."""
    out = model(input_ids=ids, use_cache=False, output_hidden_states=True, logits_to_keep=1)
    return out.hidden_states[-1]


def _logits(model: nn.Module, hidden: Tensor) -> Tensor:
    """LM head on a slice of final hidden states, with the model's logit soft-capping if it has one."""
    logits = model.get_output_embeddings()(hidden).float()
    cap = getattr(model.config, "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits


@torch.no_grad()
def token_metrics(model: nn.Module, chunks: Chunks, teacher: nn.Module | None = None, slice_len: int = 1024,
                  buckets: tuple[tuple[int, int], ...] = POSITION_BUCKETS) -> dict:
    """Per-token NLL summed by position bucket, and with a teacher KL(teacher‖model) and top-1 agreement.

    Logits are formed ``slice_len`` positions at a time from the final hidden states, so an 8k-token
    window never holds an (8k × vocab) logit tensor per model.

    Returns:
        ``{"ppl", "tokens", "by_position": {bucket: {"ppl", "tokens"}}}``, plus with a teacher
        ``"teacher_ppl"``, ``"kl"`` (mean nats per token), ``"top1_agreement"`` and the teacher's
        ``by_position`` under ``"teacher_by_position"``.
    """
    device = next(model.parameters()).device
    sums = {"nll": 0.0, "tnll": 0.0, "kl": 0.0, "agree": 0, "n": 0}
    per_bucket = {b: [0.0, 0.0, 0] for b in buckets}  # nll, teacher nll, count
    for i in range(len(chunks)):
        ids, labels = (x.to(device) for x in chunks[i])
        hidden = _final_hidden(model, ids)
        t_hidden = _final_hidden(teacher, ids.to(next(teacher.parameters()).device)).to(device) if teacher else None
        t = ids.shape[1] - 1  # predictions for positions 1..T-1 come from positions 0..T-2
        for start in range(0, t, slice_len):
            stop = min(start + slice_len, t)
            target = labels[:, start + 1 : stop + 1]
            keep = target != -100
            logp = torch.log_softmax(_logits(model, hidden[:, start:stop]), -1)
            nll = -logp.gather(-1, target.clamp(min=0).unsqueeze(-1)).squeeze(-1)  # (B, S)
            tnll = None
            if t_hidden is not None:
                t_logp = torch.log_softmax(_logits(teacher, t_hidden[:, start:stop]), -1)
                tnll = -t_logp.gather(-1, target.clamp(min=0).unsqueeze(-1)).squeeze(-1)
                kl = (t_logp.exp() * (t_logp - logp)).sum(-1)
                sums["kl"] += float(kl[keep].sum())
                sums["agree"] += int((t_logp.argmax(-1) == logp.argmax(-1))[keep].sum())
                sums["tnll"] += float(tnll[keep].sum())
            sums["nll"] += float(nll[keep].sum())
            sums["n"] += int(keep.sum())
            pos = torch.arange(start + 1, stop + 1, device=device).expand_as(target)  # position of the predicted token
            for lo, hi in buckets:
                m = keep & (pos >= lo) & (pos < hi)
                if m.any():
                    per_bucket[(lo, hi)][0] += float(nll[m].sum())
                    per_bucket[(lo, hi)][1] += float(tnll[m].sum()) if tnll is not None else 0.0
                    per_bucket[(lo, hi)][2] += int(m.sum())
    n = max(sums["n"], 1)
    out = {"ppl": math.exp(sums["nll"] / n), "tokens": sums["n"],
           "by_position": {bucket_name(*b): {"ppl": math.exp(v[0] / v[2]), "tokens": v[2]}
                           for b, v in per_bucket.items() if v[2]}}
    if teacher is not None:
        out.update(teacher_ppl=math.exp(sums["tnll"] / n), kl=sums["kl"] / n, top1_agreement=sums["agree"] / n,
                   teacher_by_position={bucket_name(*b): {"ppl": math.exp(v[1] / v[2]), "tokens": v[2]}
                                        for b, v in per_bucket.items() if v[2]})
    return out
