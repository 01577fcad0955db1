"""Held-out perplexity over fixed-length windows."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator

import torch
from torch import Tensor, nn

from lolcats.data import Chunks


def sliding_window_mask(t: int, window: int, dtype: torch.dtype, device: torch.device, sinks: int = 0) -> Tensor:
    """(1, 1, T, T) additive mask: each query sees its last ``window`` keys (itself included) and, with
    ``sinks``, also the first ``sinks`` tokens of the sequence (attention sinks, StreamingLLM).

    Query i may see key j iff j <= i and (i - j < window or j < sinks). Built with in-place triangles, so
    an 8192-token mask holds one (T, T) boolean and the (T, T) mask itself.
    """
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise ValueError(f"window={window!r} must be a positive integer (keys each query sees)")
    if isinstance(sinks, bool) or not isinstance(sinks, int) or sinks < 0:
        raise ValueError(f"sinks={sinks!r} must be a non-negative integer (0 for a window alone)")
    allowed = torch.ones(t, t, dtype=torch.bool, device=device).tril_().triu_(1 - window)
    if sinks:
        s = min(sinks, t)
        allowed[:, :s] = torch.ones(t, s, dtype=torch.bool, device=device).tril_()
    mask = torch.zeros(t, t, dtype=dtype, device=device).masked_fill_(~allowed, torch.finfo(dtype).min)
    return mask[None, None]


class _WindowMasks:
    """The additive mask of a window (+ sinks) baseline for a softmax model, one per sequence length (every
    window of an evaluation set has the same length, so one mask serves all of them and every layer)."""

    def __init__(self, model: nn.Module, window: int | None, sinks: int = 0) -> None:
        if window is None and sinks:
            raise ValueError(f"sinks={sinks} needs a window: the sinks are kept beside a window of recent keys")
        self.model, self.window, self.sinks = model, window, sinks
        self.masks: dict[int, Tensor] = {}

    def kwargs(self, t: int) -> dict[str, Tensor]:
        """``attention_mask=`` for a forward pass over ``t`` tokens, or nothing for the model as it is."""
        if self.window is None:
            return {}
        if t not in self.masks:
            p = next(self.model.parameters())
            self.masks = {t: sliding_window_mask(t, self.window, p.dtype, p.device, self.sinks)}
        return {"attention_mask": self.masks[t]}

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        """Run the model with an attention that takes a custom 4D mask (eager or sdpa; transformers returns a
        4D ``attention_mask`` as it is). A model loaded with another kernel (flash_attention_2) runs sdpa
        while masked and is switched back after."""
        impl = getattr(getattr(self.model, "config", None), "_attn_implementation", None)
        if self.window is None or impl in (None, "eager", "sdpa"):
            yield
            return
        self.model.set_attn_implementation("sdpa")
        try:
            yield
        finally:
            self.model.set_attn_implementation(impl)


@torch.no_grad()
def window_nll(model: nn.Module, chunks: Chunks, attention_window: int | None = None,
               progress: Callable[[int], object] | None = None, sinks: int = 0) -> tuple[float, int]:
    """Summed next-token NLL and the number of predicted tokens over ``chunks``.

    Args:
        attention_window: evaluate a softmax model with only a sliding window of this many keys (the
            window-only baseline); None for the model as it is.
        progress: called with the number of windows done after each one.
        sinks: with ``attention_window``, each query also sees the first ``sinks`` tokens of its window
            (the window + sinks baseline).
    """
    device = next(model.parameters()).device
    masks = _WindowMasks(model, attention_window, sinks)
    total, count = 0.0, 0
    with masks.active():
        for i in range(len(chunks)):
            ids, labels = (x.to(device) for x in chunks[i])
            logits = model(input_ids=ids, use_cache=False, **masks.kwargs(ids.shape[1])).logits.float()
            target = labels[:, 1:]
            nll = nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), target.flatten(), ignore_index=-100,
                                              reduction="sum")
            total += nll.item()
            count += int((target != -100).sum())
            if progress is not None:
                progress(i + 1)
    return total, count


def perplexity(model: nn.Module, chunks: Chunks, attention_window: int | None = None,
               progress: Callable[[int], object] | None = None, sinks: int = 0) -> float:
    """exp(mean next-token NLL) over ``chunks``; ``attention_window`` and ``sinks`` as in :func:`window_nll`."""
    total, count = window_nll(model, chunks, attention_window, progress, sinks)
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


def _final_hidden(model: nn.Module, ids: Tensor, **kwargs: Tensor) -> Tensor:
    """(B, T, H) hidden states entering the LM head (after the final norm); ``kwargs``: an attention mask."""
    out = model(input_ids=ids, use_cache=False, output_hidden_states=True, logits_to_keep=1, **kwargs)
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
                  buckets: tuple[tuple[int, int], ...] = POSITION_BUCKETS, window: int | None = None,
                  sinks: int = 0, progress: Callable[[int], object] | None = None) -> dict:
    """Per-token NLL summed by position bucket, and with a teacher KL(teacher‖model) and top-1 agreement.

    Logits are formed ``slice_len`` positions at a time from the final hidden states, so an 8k-token
    window never holds an (8k × vocab) logit tensor per model. With ``window`` (and ``sinks``) a softmax
    ``model`` sees only that many recent keys (and the first ``sinks`` tokens), as in :func:`window_nll`;
    the teacher always runs as it is. ``progress`` is called with the number of windows done after each one.

    Returns:
        ``{"ppl", "tokens", "by_position": {bucket: {"ppl", "tokens"}}}``, plus with a teacher
        ``"teacher_ppl"``, ``"kl"`` (mean nats per token), ``"top1_agreement"`` and the teacher's
        ``by_position`` under ``"teacher_by_position"``.
    """
    device = next(model.parameters()).device
    sums = {"nll": 0.0, "tnll": 0.0, "kl": 0.0, "agree": 0, "n": 0}
    per_bucket = {b: [0.0, 0.0, 0] for b in buckets}  # nll, teacher nll, count
    masks = _WindowMasks(model, window, sinks)
    for i in range(len(chunks)):
        ids, labels = (x.to(device) for x in chunks[i])
        with masks.active():
            hidden = _final_hidden(model, ids, **masks.kwargs(ids.shape[1]))
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
        if progress is not None:
            progress(i + 1)
    n = max(sums["n"], 1)
    out = {"ppl": math.exp(sums["nll"] / n), "tokens": sums["n"],
           "by_position": {bucket_name(*b): {"ppl": math.exp(v[0] / v[2]), "tokens": v[2]}
                           for b, v in per_bucket.items() if v[2]}}
    if teacher is not None:
        out.update(teacher_ppl=math.exp(sums["tnll"] / n), kl=sums["kl"] / n, top1_agreement=sums["agree"] / n,
                   teacher_by_position={bucket_name(*b): {"ppl": math.exp(v[1] / v[2]), "tokens": v[2]}
                                        for b, v in per_bucket.items() if v[2]})
    return out
