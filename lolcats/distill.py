"""Stage 1, attention transfer (DESIGN.md §1; paper §3.1).

Each linearized layer is wrapped by :class:`TransferAttention`, which computes the teacher (the
model's own softmax attention, through its configured implementation) and the student (hybrid
attention) from the same frozen q/k/v, records their MSE, and passes the *teacher's* output on. So
hidden states stay those of the original model and all layers train at once, and no autograd graph
spans more than one layer's feature maps.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor, nn
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from lolcats.attention import LolcatsAttention, token_validity
from lolcats.config import DistillConfig
from lolcats.convert import replace_linearized, restore_linearized, trainable_attention_parameters
from lolcats.data import Chunks
from lolcats.training import StageResult, StageSpec, Trainer

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
    """Stage-1 stand-in for one layer: teacher output flows on, student MSE is recorded."""

    def __init__(self, student: LolcatsAttention, impl: str, sliding_window: int | None,
                 attention_ce_weight: float = 0.0) -> None:
        super().__init__()
        self.student = student
        self.impl, self.sliding_window = impl, sliding_window
        self.attention_ce_weight = attention_ce_weight
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
            y = s.attend(q, k, v, valid)
            err = (y - target).square()
            if valid is not None:
                m = valid[:, None, :, None].to(err.dtype)
                mse = (err * m).sum() / (m.sum() * err.shape[1] * err.shape[-1]).clamp(min=1)
            else:
                mse = err.mean()
            self.losses.append(mse)
            if self.attention_ce_weight > 0:
                self.extra.append(self._attention_ce(q, k, valid))
        out = teacher.transpose(1, 2).reshape(b, t, -1).to(hidden_states.dtype)
        return s.o_proj(out), None

    def _attention_ce(self, q: Tensor, k: Tensor, valid: Tensor | None) -> Tensor:
        """Hedgehog's loss: cross-entropy of the student's attention weights against softmax's (O(T²))."""
        from lolcats.ops.reference import hybrid_attention_weights, repeat_kv

        s, c = self.student, self.student.attn_config
        fq, fk = s.features(q, k)
        student = hybrid_attention_weights(q, k, fq, fk, torch.sigmoid(s.window_factor), variant=c.variant,
                                           window_size=c.window_size, scale=s.scaling, valid=valid)
        kr = repeat_kv(k, s.num_heads // s.num_kv_heads)
        scores = (q @ kr.transpose(-1, -2)) * s.scaling
        causal = torch.ones(q.shape[2], q.shape[2], dtype=torch.bool, device=q.device).tril()
        teacher = scores.masked_fill(~causal, float("-inf")).softmax(-1).detach()
        return -(teacher * student.clamp(min=1e-12).log()).sum(-1).mean()


class AttentionTransfer:
    """Wraps a converted model's linearized layers for stage 1; ``loss`` runs one teacher-forced pass."""

    def __init__(self, model: nn.Module, cfg: DistillConfig) -> None:
        self.model, self.cfg = model, cfg
        impl = model.config._attn_implementation or "sdpa"
        self.layers: list[TransferAttention] = replace_linearized(
            model, lambda s: TransferAttention(s, impl, s.native_window, cfg.attention_ce_weight))
        if not self.layers:
            raise ValueError("the model has no linearized layers to train; convert it first")

    def close(self) -> None:
        restore_linearized(self.model)

    def _forward(self, input_ids: Tensor) -> list[Tensor]:
        for layer in self.layers:
            layer.losses.clear()
            layer.extra.clear()
        device = next(self.model.parameters()).device
        with torch.no_grad():
            self.model(input_ids.to(device), use_cache=False, logits_to_keep=1)
        return [layer.losses[0] for layer in self.layers]

    def loss(self, input_ids: Tensor, labels: Tensor) -> tuple[Tensor, dict[str, float]]:
        per_layer = self._forward(input_ids)
        mse = torch.stack(per_layer).mean()
        loss = self.cfg.mse_scale * mse
        extra = {"attention_mse": mse.item()}
        if self.cfg.attention_ce_weight > 0:
            ce = torch.stack([layer.extra[0] for layer in self.layers]).mean()
            loss = loss + self.cfg.attention_ce_weight * ce
            extra["attention_ce"] = ce.item()
        return loss, extra

    @torch.no_grad()
    def per_layer_mse(self, chunks: Chunks) -> list[float]:
        """Mean over chunks of each layer's attention MSE (no ×scale)."""
        totals = torch.zeros(len(self.layers), dtype=torch.float64)
        for i in range(len(chunks)):
            totals += torch.tensor([x.item() for x in self._forward(chunks[i][0])], dtype=torch.float64)
        return (totals / len(chunks)).tolist()


def run_stage1(model: nn.Module, train: Chunks, heldout: Chunks, cfg: DistillConfig, state_dir: Path, seed: int,
               log: Callable[[dict], None], progress: Callable[[int, int, dict], None] | None = None) -> StageResult:
    """Train feature maps and window factors; leaves the model converted, with the best weights loaded."""
    params = trainable_attention_parameters(model)
    transfer = AttentionTransfer(model, cfg)
    try:
        spec = StageSpec(
            name="stage1", params=params, loss_fn=transfer.loss,
            eval_fn=lambda: cfg.mse_scale * sum(transfer.per_layer_mse(heldout)) / len(transfer.layers),
            max_steps=cfg.max_steps, grad_accum=cfg.grad_accum, lr=cfg.lr, weight_decay=cfg.weight_decay,
            eval_every=cfg.eval_every, checkpoint_every=cfg.checkpoint_every, max_grad_norm=cfg.max_grad_norm,
            scheduler=cfg.scheduler, plateau_patience=cfg.plateau_patience, plateau_factor=cfg.plateau_factor,
            min_lr=cfg.min_lr, data_parallel=True)
        return Trainer(spec, train, state_dir, seed, log, progress).run()
    finally:
        transfer.close()


def heldout_attention_mse(model: nn.Module, chunks: Chunks) -> list[float]:
    """Per-layer held-out attention MSE of a converted model (DESIGN.md's "attention MSE", no ×1000)."""
    transfer = AttentionTransfer(model, DistillConfig())
    try:
        return transfer.per_layer_mse(chunks)
    finally:
        transfer.close()
