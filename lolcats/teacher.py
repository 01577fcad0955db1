"""The original softmax model inside a linearized one: the teacher of stage 2's ``kl`` loss.

A linearized model keeps the original q/k/v/o projections (and q/k norms) in each
:class:`~lolcats.attention.LolcatsAttention`, so the original model is at hand without a second copy of
the weights: :func:`softmax_teacher` puts a softmax stand-in in place of every linearized layer and
turns the LoRA adapters off, and puts everything back on the way out (also after an error).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from lolcats.attention import LolcatsAttention
from lolcats.convert import replace_linearized, restore_linearized
from lolcats.data import IGNORE
from lolcats.distill import softmax_attention


class SoftmaxAttention(nn.Module):
    """A linearized layer computed as the original one: softmax attention (the model's configured
    implementation, the layer's native sliding window) over the same q/k/v and output projection."""

    def __init__(self, student: LolcatsAttention, impl: str) -> None:
        super().__init__()
        self.student = student  # the name :func:`lolcats.convert.restore_linearized` looks for
        self.impl = impl
        # attributes HF attention functions read from their module
        self.layer_idx = student.layer_idx
        self.num_key_value_groups = student.num_heads // student.num_kv_heads
        self.is_causal = True
        self.config = student.hf_config

    def forward(self, hidden_states: Tensor, position_embeddings: tuple[Tensor, Tensor] | None = None,
                attention_mask: Tensor | None = None, past_key_values: object | None = None,
                **kwargs: object) -> tuple[Tensor, None]:
        if past_key_values is not None:
            raise ValueError("the softmax teacher runs whole sequences; call the model with use_cache=False")
        s = self.student
        b, t, _ = hidden_states.shape
        q, k, v = s.qkv(hidden_states, position_embeddings)
        out = softmax_attention(self, q, k, v, attention_mask, self.impl, s.scaling, s.native_window)
        return s.o_proj(out.transpose(1, 2).reshape(b, t, -1)), None


def _adapters_off(model: nn.Module) -> contextlib.AbstractContextManager:
    """peft's ``disable_adapter()`` context for a peft model; nothing to do for a plain one."""
    disable = getattr(model, "disable_adapter", None)
    return disable() if callable(disable) else contextlib.nullcontext()


@contextlib.contextmanager
def softmax_teacher(model: nn.Module) -> Iterator[nn.Module]:
    """Within the context ``model`` (converted, with or without peft LoRA) computes the original softmax
    model: each linearized layer runs as :class:`SoftmaxAttention` and the LoRA adapters are off. On the
    way out, also after an exception, the linearized layers and the adapters are back.

    Raises:
        ValueError: the model has no linearized layer (it is its own teacher).
    """
    impl = getattr(model.config, "_attn_implementation", None) or "sdpa"
    with _adapters_off(model):
        try:
            if not replace_linearized(model, lambda s: SoftmaxAttention(s, impl)):
                raise ValueError("the model has no linearized layers; the softmax teacher needs a converted model")
            yield model
        finally:
            restore_linearized(model)


@torch.no_grad()
def teacher_logits(model: nn.Module, input_ids: Tensor) -> Tensor:
    """(B, T, V) next-token logits of the original softmax model inside ``model`` (no gradient)."""
    device = next(model.parameters()).device
    with softmax_teacher(model):
        return model(input_ids=input_ids.to(device), use_cache=False).logits


def predicted(logits: Tensor, labels: Tensor) -> Tensor:
    """(N, V) logits of the N positions whose next token is predicted (its label is not ``-100``): position
    t's logits predict token t + 1. A view of ``logits`` when every position counts and B is 1."""
    keep = labels[:, 1:].to(logits.device) != IGNORE  # (B, T - 1)
    x = logits[:, :-1]
    return x.reshape(-1, x.shape[-1]) if bool(keep.all()) else x[keep]


def kl_divergence(student_logits: Tensor, teacher_logits: Tensor, labels: Tensor, temperature: float = 1.0) -> Tensor:
    """KL(teacher ‖ student) of the next-token distributions, mean over predicted tokens.

    A position counts where the token it predicts has a label other than ``-100`` (prompts and
    padding, as in the next-token loss). Both distributions are softened by ``temperature`` T and the KL
    is scaled by T², so gradients keep their size as T changes. Computed in float32; besides the
    student's log-probabilities (kept for the backward pass) it holds one (N, V) tensor of teacher
    probabilities.

    Args:
        student_logits, teacher_logits: (B, T, V) in any float dtype; only the student's carry gradients.
        labels: (B, T) token ids with ``-100`` where nothing is predicted.
    """
    with torch.no_grad():
        log_p = F.log_softmax(predicted(teacher_logits, labels).float().to(student_logits.device) / temperature, -1)
        p = log_p.exp()
        teacher_term = (p * log_p).sum()  # −entropy of the teacher
        del log_p
    log_q = F.log_softmax(predicted(student_logits, labels).float() / temperature, -1)
    kl = teacher_term - (p * log_q).sum()
    return kl * (temperature ** 2) / max(p.shape[0], 1)


@torch.no_grad()
def next_token_nll(logits: Tensor, labels: Tensor) -> Tensor:
    """Mean next-token cross-entropy over predicted tokens (no gradient; for the log)."""
    target = labels[:, 1:].to(logits.device)
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), target.reshape(-1),
                           ignore_index=IGNORE)
