"""Stage 2, LoRA repair (docs/design.md §3): peft LoRA on the attention projections, feature maps and
window factors frozen; the loss is next-token cross-entropy or, with ``lora.loss: kl``, the KL divergence
from the original softmax model (:mod:`lolcats.teacher`)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor, nn

from lolcats.config import LoraConfig
from lolcats.data import Chunks
from lolcats.models import family_for
from lolcats.teacher import kl_divergence, next_token_nll, teacher_logits
from lolcats.training import StageResult, StageSpec, Trainer

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


@torch.no_grad()
def mean_loss(model: nn.Module, chunks: Chunks) -> float:
    total = 0.0
    for i in range(len(chunks)):
        total += next_token_loss(model, *chunks[i]).item()
    return total / len(chunks)


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
            peft_model.train(was_training)

    spec = StageSpec(name="stage2", params=lora_parameters(peft_model), loss_fn=stage2_loss(peft_model, cfg),
                     eval_fn=eval_fn, loop=cfg, data_parallel=True)
    peft_model.train()
    try:
        return Trainer(spec, train, state_dir, seed, log, progress).run()
    finally:
        peft_model.eval()
