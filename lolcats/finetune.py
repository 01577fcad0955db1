"""Stage 2, LoRA repair (docs/design.md §3): peft LoRA on the attention projections, feature maps and
window factors frozen; the loss is next-token cross-entropy or, with ``lora.loss: kl``, the KL divergence
from the original softmax model (:mod:`lolcats.teacher`). With ``lora.activation_checkpointing`` (the default)
each decoder layer keeps only its inputs for the backward pass (:func:`checkpointed_layers`)."""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from lolcats.attention import find_decoder_layers
from lolcats.config import LoraConfig
from lolcats.data import Chunks
from lolcats.models import family_for
from lolcats.teacher import kl_divergence, next_token_nll, teacher_logits
from lolcats.training import StageResult, StageSpec, Trainer, release_heap

logger = logging.getLogger(__name__)


def lora_targets(model: nn.Module, cfg: LoraConfig) -> list[str]:
    return list(cfg.target_modules) or list(family_for(model).lora_targets())


def add_lora(model: nn.Module, cfg: LoraConfig, seed: int) -> nn.Module:
    """Wrap ``model`` with peft LoRA adapters (seeded init); every other weight is frozen."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    for p in model.parameters():
        p.requires_grad_(False)
    peft_cfg = PeftLoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
                              target_modules=lora_targets(model, cfg), bias="none", task_type="CAUSAL_LM")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return get_peft_model(model, peft_cfg)


def lora_parameters(peft_model: nn.Module) -> dict[str, nn.Parameter]:
    return {name: p for name, p in peft_model.named_parameters() if p.requires_grad}


def next_token_loss(model: nn.Module, input_ids: Tensor, labels: Tensor) -> Tensor:
    device = next(model.parameters()).device
    return model(input_ids=input_ids.to(device), labels=labels.to(device), use_cache=False).loss


def kl_loss(model: nn.Module, input_ids: Tensor, labels: Tensor, temperature: float = 1.0) -> tuple[Tensor, Tensor]:
    """KL(original softmax model ‖ ``model``) over the predicted tokens (:func:`lolcats.teacher.kl_divergence`),
    and the next-token loss of the same pass (without gradient, for the log).

    The teacher runs first, without gradients and with the adapters off; its logits live for this call only.
    """
    device = next(model.parameters()).device
    target = teacher_logits(model, input_ids)
    logits = model(input_ids=input_ids.to(device), use_cache=False).logits
    return kl_divergence(logits, target, labels, temperature), next_token_nll(logits, labels)


def stage2_loss(model: nn.Module, cfg: LoraConfig) -> Callable[[Tensor, Tensor], tuple[Tensor, dict[str, float]]]:
    """The training loss ``lora.loss`` names, as a :class:`~lolcats.training.StageSpec` ``loss_fn``."""
    if cfg.loss == "kl":
        def kl(input_ids: Tensor, labels: Tensor) -> tuple[Tensor, dict[str, float]]:
            loss, next_token = kl_loss(model, input_ids, labels, cfg.kl_temperature)
            return loss, {"next_token_loss": next_token.item()}
        return kl
    if cfg.loss == "next_token":
        return lambda input_ids, labels: (next_token_loss(model, input_ids, labels), {})
    raise ValueError(f"lora.loss={cfg.loss!r} is not valid; choose one of {', '.join(map(repr, cfg.losses))}")


def _checkpointed(forward: Callable[..., object], *args: object, **kwargs: object) -> object:
    """A decoder layer's ``forward`` under activation checkpointing: with autograd on, it keeps only its inputs
    and runs again in the backward pass. Without autograd (evaluation, the KL teacher) nothing is kept anyway, and
    a forward that writes a cache runs as it is: a recompute would write it twice. The layer's freed intermediates
    go back to the system before the next layer runs (:func:`lolcats.training.release_heap`): on CPU the forward
    pass otherwise spreads over ever more heap pages, one layer after another (docs/memory.md)."""
    if not torch.is_grad_enabled() or kwargs.get("past_key_values") is not None:
        return forward(*args, **kwargs)
    out = checkpoint(forward, *args, use_reentrant=False, **kwargs)
    release_heap()
    return out


@contextlib.contextmanager
def checkpointed_layers(model: nn.Module, enabled: bool = True) -> Iterator[None]:
    """Within the context every decoder layer of ``model`` (peft-wrapped or not) is activation-checkpointed
    (:func:`torch.utils.checkpoint.checkpoint`, non-reentrant): the backward pass holds one layer's activations
    at a time instead of all of them, for one more forward pass of the layers. The recompute gives the same
    values because a training forward is a pure function of the layer's inputs and weights: no cache
    (``use_cache=False``), no state written, and the RNG state (LoRA dropout) is replayed. Each layer's own
    ``forward`` comes back on the way out, also after an error; ``enabled`` False changes nothing."""
    if not enabled:
        yield
        return
    own = [(layer, layer.__dict__.get("forward")) for layer in find_decoder_layers(model)]
    for layer, _ in own:
        layer.forward = functools.partial(_checkpointed, layer.forward)  # shadows the class's forward
    try:
        yield
    finally:
        for layer, forward in own:
            if forward is None:
                del layer.forward
            else:
                layer.forward = forward


def _release_after_layer(module: nn.Module, args: tuple, output: object) -> None:
    """Forward hook of a decoder layer in a training pass: its freed intermediates go back to the system
    (:func:`lolcats.training.release_heap`) before the next layer allocates its own."""
    if torch.is_grad_enabled():
        release_heap()


@contextlib.contextmanager
def heap_released_per_layer(model: nn.Module, enabled: bool = True) -> Iterator[None]:
    """Within the context, each decoder layer's training forward ends by handing the C heap's free pages back.
    Without checkpointing the layers' kept activations and their freed intermediates interleave on the heap,
    whose freed pages then stay resident: stage 2 of SmolLM2 at 1,024 tokens peaked 1.2 GB above what its
    tensors need, and 0.1 GB above with this (docs/memory.md). Checkpointed layers already release after each
    forward (:func:`checkpointed_layers`); ``enabled`` False changes nothing."""
    hooks = [layer.register_forward_hook(_release_after_layer) for layer in find_decoder_layers(model)] if enabled else []
    try:
        yield
    finally:
        for h in hooks:
            h.remove()


def _release_before_logits(module: nn.Module, args: tuple) -> None:
    """Forward pre-hook of the output embedding: the decoder layers' freed intermediates go back to the system
    (:func:`lolcats.training.release_heap`) before the logits over the vocabulary are allocated."""
    release_heap()


@torch.no_grad()
def mean_loss(model: nn.Module, chunks: Chunks) -> float:
    total = 0.0
    for i in range(len(chunks)):
        total += next_token_loss(model, *chunks[i]).item()
    return total / len(chunks)


# Attributes of modules that draw random numbers in training mode in the frozen base (MoE routers' jitter)
RANDOM_IN_TRAINING = ("jitter_noise", "input_jitter_noise", "router_jitter_noise")


def train_mode(model: nn.Module) -> None:
    """Training mode for LoRA (its dropout), while the frozen base computes as at inference: a mixture-of-experts
    block in training mode jitters its input and samples its routing (phimoe, mixtral), which would train the
    adapters under a routing that generation never uses (and give the KL teacher other samples)."""
    model.train()
    for module in model.modules():
        if any(getattr(module, name, 0) for name in RANDOM_IN_TRAINING):
            module.eval()


def run_stage2(peft_model: nn.Module, train: Chunks, heldout: Chunks, cfg: LoraConfig, state_dir: Path, seed: int,
               log: Callable[[dict], None], progress: Callable[[int, int, dict], None] | None = None) -> StageResult:
    """Train LoRA weights with ``lora.loss`` (next-token cross-entropy, or KL from the original softmax
    model); prompts are already masked in ``labels``. The held-out loss, and so the best checkpoint, is
    next-token cross-entropy with either training loss."""
    def eval_fn() -> float:
        was_training = peft_model.training
        peft_model.eval()
        try:
            return mean_loss(peft_model, heldout)
        finally:
            if was_training:
                train_mode(peft_model)

    spec = StageSpec(name="stage2", params=lora_parameters(peft_model), loss_fn=stage2_loss(peft_model, cfg),
                     eval_fn=eval_fn, loop=cfg, data_parallel=True)
    train_mode(peft_model)
    head = peft_model.get_output_embeddings()
    hook = head.register_forward_pre_hook(_release_before_logits) if head is not None else None
    try:
        with checkpointed_layers(peft_model, cfg.activation_checkpointing), \
                heap_released_per_layer(peft_model, not cfg.activation_checkpointing):
            return Trainer(spec, train, state_dir, seed, log, progress).run()
    finally:
        if hook is not None:
            hook.remove()
        peft_model.eval()
