"""Stage 1, attention transfer (docs/design.md §3; paper §3.1).

Each linearized layer is wrapped by :class:`TransferAttention`, which computes the teacher (the
model's own softmax attention, through its configured implementation) and the student (hybrid
attention) from the same frozen q/k/v, records their MSE, and passes the *teacher's* output on. So
hidden states stay those of the original model and all layers train at once, and no autograd graph
spans more than one layer's feature maps. The loss sums every layer's MSE before one backward pass, so every
layer's student graph is held at once; with ``distill.activation_checkpointing`` (the default) each keeps only
its inputs (q, k, v and the teacher's output) and the student runs again in the backward pass.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Container
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from lolcats.attention import LolcatsAttention, find_decoder_layers, token_validity
from lolcats.config import DistillConfig
from lolcats.convert import replace_linearized, restore_linearized, trainable_attention_parameters
from lolcats.data import Chunks
from lolcats.training import StageResult, StageSpec, Trainer, release_heap_if_grown

logger = logging.getLogger(__name__)


def softmax_attention(module: nn.Module, q: Tensor, k: Tensor, v: Tensor, attention_mask: Tensor | None,
                      impl: str, scaling: float, sliding_window: int | None) -> Tensor:
    """The teacher: (B, H, T, D) queries, (B, Hkv, T, D) keys/values -> (B, H, T, D), through HF's
    attention function for ``impl`` (sdpa, eager or flash_attention_2)."""
    from transformers.models.llama.modeling_llama import eager_attention_forward

    fn = ALL_ATTENTION_FUNCTIONS.get_interface(impl, eager_attention_forward)
    kwargs = {"sliding_window": sliding_window} if sliding_window is not None else {}
    out, _ = fn(module, q, k, v, attention_mask, dropout=0.0, scaling=scaling, **kwargs)
    return out.transpose(1, 2)  # HF returns (B, T, H, D)


class TransferAttention(nn.Module):
    """Stage-1 stand-in for one layer: teacher output flows on, student MSE is recorded (with
    ``activation_checkpointing`` the student's activations are recomputed in the backward pass, not kept)."""

    def __init__(self, student: LolcatsAttention, impl: str, sliding_window: int | None,
                 attention_ce_weight: float = 0.0, activation_checkpointing: bool = False) -> None:
        super().__init__()
        self.student = student
        self.impl, self.sliding_window = impl, sliding_window
        self.attention_ce_weight = attention_ce_weight
        self.activation_checkpointing = activation_checkpointing
        # attributes HF attention functions read from their module
        self.layer_idx = student.layer_idx
        self.num_key_value_groups = student.num_heads // student.num_kv_heads
        self.is_causal = True
        self.config = student.hf_config
        self.losses: list[Tensor] = []
        self.extra: list[Tensor] = []

    def forward(self, hidden_states: Tensor, position_embeddings: tuple[Tensor, Tensor] | None = None,
                attention_mask: Tensor | None = None, past_key_values: object | None = None,
                **kwargs: object) -> tuple[Tensor, None]:
        s = self.student
        b, t, _ = hidden_states.shape
        with torch.no_grad():
            q, k, v = s.qkv(hidden_states, position_embeddings)
            teacher = softmax_attention(self, q, k, v, attention_mask, self.impl, s.scaling, self.sliding_window)
            dtype = torch.promote_types(q.dtype, torch.float32)
            q, k, v, target = q.to(dtype), k.to(dtype), v.to(dtype), teacher.to(dtype)
        valid = token_validity(attention_mask, t)
        with torch.enable_grad():
            if self.activation_checkpointing:  # a pure function of its inputs and the student's weights
                mse, ce = checkpoint(self._student_losses, q, k, v, target, valid, use_reentrant=False)
            else:
                mse, ce = self._student_losses(q, k, v, target, valid)
        self.losses.append(mse)
        if ce is not None:
            self.extra.append(ce)
        out = teacher.transpose(1, 2).reshape(b, t, -1).to(hidden_states.dtype)
        return s.o_proj(out), None

    def _student_losses(self, q: Tensor, k: Tensor, v: Tensor, target: Tensor,
                        valid: Tensor | None) -> tuple[Tensor, Tensor | None]:
        """MSE of the student's (B, H, T, D) output against the teacher's ``target`` over real tokens, and the
        attention cross-entropy when it is weighted (else None)."""
        y = self.student.attend(q, k, v, valid)
        err = (y - target).square()
        if valid is not None:
            m = valid[:, None, :, None].to(err.dtype)
            mse = (err * m).sum() / (m.sum() * err.shape[1] * err.shape[-1]).clamp(min=1)
        else:
            mse = err.mean()
        return mse, self._attention_ce(q, k, valid) if self.attention_ce_weight > 0 else None

    def _attention_ce(self, q: Tensor, k: Tensor, valid: Tensor | None) -> Tensor:
        """Hedgehog's loss: cross-entropy of the student's attention weights against softmax's (O(T²))."""
        from lolcats.ops.reference import hybrid_attention_weights, repeat_kv

        s = self.student
        fq, fk = s.features(q, k)
        student = hybrid_attention_weights(q, k, fq, fk, s.gamma(), s.spec, valid, s.log_decay())
        kr = repeat_kv(k, s.num_heads // s.num_kv_heads)
        scores = (q @ kr.transpose(-1, -2)) * s.scaling
        causal = torch.ones(q.shape[2], q.shape[2], dtype=torch.bool, device=q.device).tril()
        teacher = scores.masked_fill(~causal, float("-inf")).softmax(-1).detach()
        return -(teacher * student.clamp(min=1e-12).log()).sum(-1).mean()


RELEASE_GROWTH = 128 << 20  # bytes; releasing after every layer cost 24 % of a step, after 128 MB of growth 5 %


def _release_after_layer(module: nn.Module, args: tuple, output: object) -> None:
    release_heap_if_grown(RELEASE_GROWTH)


class ModelRunner:
    """Runs the whole converted model on token ids (B, T): joint stage 1's runner."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def __call__(self, input_ids: Tensor) -> None:
        device = next(self.model.parameters()).device
        self.model(input_ids.to(device), use_cache=False, logits_to_keep=1)


class AttentionTransfer:
    """Stage 1's engine: wraps linearized layers in :class:`TransferAttention`; ``loss`` runs one
    teacher-forced pass and weights each layer's MSE by 1/L.

    Args:
        model: a converted model (all of it, or a block-by-block skeleton whose other layers stay on meta).
        cfg: the ``distill`` section.
        runner: what runs the model on one training input; default :class:`ModelRunner` (token ids).
            Block-by-block training passes one that runs a block's layers on stored hidden states.
        layer_ids: wrap only these decoder layers (default: every linearized layer).
        total_layers: L of the 1/L weighting (default: the wrapped layers). A block passes the count of
            the whole model's linearized layers, so its layers get the gradients of joint training.
    """

    def __init__(self, model: nn.Module, cfg: DistillConfig, runner: Callable[[Tensor], None] | None = None,
                 layer_ids: Container[int] | None = None, total_layers: int | None = None) -> None:
        self.model, self.cfg = model, cfg
        self.runner = runner or ModelRunner(model)
        impl = model.config._attn_implementation or "sdpa"

        def wrap(s: LolcatsAttention) -> nn.Module:
            if layer_ids is not None and s.layer_idx not in layer_ids:
                return s
            return TransferAttention(s, impl, s.native_window, cfg.attention_ce_weight, cfg.activation_checkpointing)

        self.layers = [m for m in replace_linearized(model, wrap) if isinstance(m, TransferAttention)]
        if not self.layers:
            raise ValueError("the model has no linearized layers to train; convert it first")
        self.total = total_layers or len(self.layers)
        # after a decoder layer's pass, once the process has grown by RELEASE_GROWTH, the heap's free pages go
        # back: the teacher's and the student's freed intermediates would otherwise stay resident between the
        # tensors each layer keeps (SmolLM2 at 1,024 tokens: peak 3.56 -> 3.08 GB, with checkpointing 1.62 -> 1.54;
        # docs/memory.md)
        self._hooks = [layer.register_forward_hook(_release_after_layer) for layer in find_decoder_layers(model)]

    def close(self) -> None:
        for h in self._hooks:
            h.remove()
        restore_linearized(self.model)

    def _forward(self, inputs: Tensor) -> list[Tensor]:
        for layer in self.layers:
            layer.losses.clear()
            layer.extra.clear()
        with torch.no_grad():
            self.runner(inputs)
        return [layer.losses[0] for layer in self.layers]

    def loss(self, inputs: Tensor, labels: Tensor | None = None) -> tuple[Tensor, dict[str, float]]:
        """``mse_scale`` × Σ_l MSE_l / L (+ the attention cross-entropy, weighted alike) on one input."""
        per_layer = torch.stack(self._forward(inputs))
        loss = self.cfg.mse_scale * (per_layer.sum() / self.total)
        extra = {"attention_mse": per_layer.mean().item()}
        if self.cfg.attention_ce_weight > 0:
            ce = torch.stack([layer.extra[0] for layer in self.layers])
            loss = loss + self.cfg.attention_ce_weight * (ce.sum() / self.total)
            extra["attention_ce"] = ce.mean().item()
        return loss, extra

    @torch.no_grad()
    def per_layer_mse(self, data: Chunks) -> list[float]:
        """Mean over ``data``'s items of each wrapped layer's attention MSE (no ×scale)."""
        totals = torch.zeros(len(self.layers), dtype=torch.float64)
        for i in range(len(data)):
            totals += torch.tensor([x.item() for x in self._forward(data[i][0])], dtype=torch.float64)
        return (totals / len(data)).tolist()

    def heldout_loss(self, heldout: Chunks) -> float:
        """The held-out counterpart of :meth:`loss` (MSE part): ``mse_scale`` × Σ_l MSE_l / L."""
        return self.cfg.mse_scale * sum(self.per_layer_mse(heldout)) / self.total

    def stage(self, name: str, params: dict[str, nn.Parameter], heldout: Chunks, data_parallel: bool) -> StageSpec:
        """The training-loop description of stage 1 (or of one block) with this loss."""
        return StageSpec(name=name, params=params, loss_fn=self.loss, eval_fn=lambda: self.heldout_loss(heldout),
                         loop=self.cfg, data_parallel=data_parallel)


def run_stage1(model: nn.Module, train: Chunks, heldout: Chunks, cfg: DistillConfig, state_dir: Path, seed: int,
               log: Callable[[dict], None], progress: Callable[[int, int, dict], None] | None = None) -> StageResult:
    """Train feature maps and window factors; leaves the model converted, with the best weights loaded."""
    params = trainable_attention_parameters(model)  # named before wrapping: resume checkpoints use these names
    transfer = AttentionTransfer(model, cfg)
    try:
        return Trainer(transfer.stage("stage1", params, heldout, data_parallel=True), train, state_dir, seed, log,
                       progress).run()
    finally:
        transfer.close()


def heldout_attention_mse(model: nn.Module, chunks: Chunks) -> list[float]:
    """Per-layer held-out attention MSE of a converted model (the report's "attention MSE", no ×1000)."""
    transfer = AttentionTransfer(model, DistillConfig())
    try:
        return transfer.per_layer_mse(chunks)
    finally:
        transfer.close()
