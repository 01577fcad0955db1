"""``lolcats blockwise train``: each block alone from its stored inputs, one block per process under
torchrun (gloo on CPU, nccl on GPUs); per-block checkpoints, metrics and resume."""

from __future__ import annotations

import json
import logging
import time
from typing import Any

import torch
from torch import Tensor, nn

from lolcats import distributed
from lolcats.blockwise.common import BlockwiseError, Progress, block_dir, block_ranges, hidden_dir, streaming_model
from lolcats.blockwise.shards import HiddenShards
from lolcats.blockwise.streaming import StreamingModel, layer_output
from lolcats.checkpoint import pick_device, resolve_model_path
from lolcats.config import LolcatsConfig
from lolcats.convert import TRAINABLE_KEYS, convert_model, linearized_layers
from lolcats.distill import TransferAttention
from lolcats.io import atomic_save_safetensors, atomic_write_text, sha256_file
from lolcats.training import StageSpec, Trainer

logger = logging.getLogger(__name__)


def _block_model(cfg: LolcatsConfig, sm: StreamingModel, layer_ids: range) -> dict[int, TransferAttention]:
    """Materialise ``layer_ids``, convert the model (other layers stay on meta) and wrap the block's
    linearized layers for attention transfer; returns the wrappers by layer index."""
    from lolcats.attention import LolcatsAttention

    for i in layer_ids:
        sm.materialize(sm.layers[i])
    convert_model(sm.model, cfg.attention, seed=cfg.seed)
    impl = sm.model.config._attn_implementation or "sdpa"
    wrappers = {}
    for i in layer_ids:
        attn = sm.layers[i].self_attn
        if isinstance(attn, LolcatsAttention):
            wrappers[i] = sm.layers[i].self_attn = TransferAttention(attn, impl, attn.native_window,
                                                                     cfg.distill.attention_ce_weight)
    return wrappers


def _block_parameters(wrappers: dict[int, TransferAttention], trainable_only: bool) -> dict[str, nn.Parameter]:
    """Feature maps and window factors of the block's layers, named as in ``attention.safetensors``."""
    return {f"layers.{i}.{n}": p for i, w in wrappers.items() for n, p in w.student.named_parameters()
            if n.startswith(TRAINABLE_KEYS) and (p.requires_grad or not trainable_only)}


class BlockTransfer:
    """Stage-1 loss of one block, fed its stored input hidden states (teacher-forced inside the block)."""

    def __init__(self, sm: StreamingModel, layer_ids: range, wrappers: dict[int, TransferAttention],
                 total_layers: int, mse_scale: float, seq_len: int) -> None:
        self.sm, self.layer_ids, self.wrappers = sm, layer_ids, wrappers
        self.total, self.scale = total_layers, mse_scale
        self.kwargs = sm.layer_inputs(seq_len=seq_len)[1]

    def _forward(self, hidden: Tensor) -> list[Tensor]:
        for w in self.wrappers.values():
            w.losses.clear()
        with torch.no_grad():
            h = hidden.to(self.sm.device, self.sm.dtype)
            for i in self.layer_ids:
                h = layer_output(self.sm.layers[i](h, **self.kwargs[i]))
        return [self.wrappers[i].losses[0] for i in sorted(self.wrappers)]

    def loss(self, hidden: Tensor, _labels: object) -> tuple[Tensor, dict[str, float]]:
        per_layer = torch.stack(self._forward(hidden))
        # each layer weighted 1/L of the whole model, exactly as in joint stage 1 (see lolcats.blockwise)
        return self.scale * (per_layer.sum() / self.total), {"attention_mse": per_layer.mean().item()}

    @torch.no_grad()
    def per_layer_mse(self, data: HiddenShards) -> list[float]:
        totals = torch.zeros(len(self.wrappers), dtype=torch.float64)
        for i in range(len(data)):
            totals += torch.tensor([x.item() for x in self._forward(data[i][0])], dtype=torch.float64)
        return (totals / len(data)).tolist()


def train_block(cfg: LolcatsConfig, block: int, progress: Progress | None = None) -> dict[str, Any]:
    """Train block ``block`` alone from its stored inputs; resumable; returns its result record."""
    out = block_dir(cfg, block)
    done = out / "result.json"
    if done.exists():
        return json.loads(done.read_text())
    sm, _ = streaming_model(cfg)
    blocks = block_ranges(len(sm.layers), cfg.blockwise.block_size)
    if not 0 <= block < len(blocks):
        raise BlockwiseError(f"block {block} does not exist: k={cfg.blockwise.block_size} splits {len(sm.layers)} layers "
                         f"into blocks 0..{len(blocks) - 1}")
    layer_ids = blocks[block]
    root = hidden_dir(cfg)
    dtype = sm.dtype
    train = HiddenShards(root, "train", block, dtype)
    heldout = HiddenShards(root, "heldout", block, dtype)
    wrappers = _block_model(cfg, sm, layer_ids)
    total = len(linearized_layers(sm.model))  # L: linearized layers of the whole model (wrapped ones included)
    result: dict[str, Any] = {"block": block, "layers": [layer_ids.start, layer_ids.stop - 1],
                              "linearized": sorted(wrappers)}
    out.mkdir(parents=True, exist_ok=True)
    if wrappers:
        transfer = BlockTransfer(sm, layer_ids, wrappers, total, cfg.distill.mse_scale, cfg.data.seq_len)
        state = out / "train_state"
        before_path = out / "mse_before.json"
        if not before_path.exists():
            atomic_write_text(before_path, json.dumps(transfer.per_layer_mse(heldout)))
        params = _block_parameters(wrappers, trainable_only=True)
        metrics = out / "metrics.jsonl"

        def log(record: dict) -> None:
            with open(metrics, "a") as f:
                f.write(json.dumps({"time": round(time.time(), 3), "block": block, **record}) + "\n")

        d = cfg.distill
        scale = d.mse_scale / total
        spec = StageSpec(
            name=f"block{block}", params=params, loss_fn=transfer.loss,
            eval_fn=lambda: scale * sum(transfer.per_layer_mse(heldout)), max_steps=cfg.steps(d, len(train)),
            grad_accum=d.grad_accum, lr=d.lr, weight_decay=d.weight_decay, eval_every=d.eval_every,
            checkpoint_every=d.checkpoint_every, max_grad_norm=d.max_grad_norm, scheduler=d.scheduler,
            plateau_patience=d.plateau_patience, plateau_factor=d.plateau_factor, min_lr=d.min_lr)
        bar = progress(f"block {block}", spec.max_steps) if progress else None
        res = Trainer(spec, train, state, cfg.seed, log, bar.update if bar else None).run()
        if bar:
            bar.end()
        result.update(steps=res.steps, tokens=res.tokens, seconds=res.seconds, best_step=res.best_step,
                      mse_before=json.loads(before_path.read_text()), mse_after=transfer.per_layer_mse(heldout))
        atomic_save_safetensors(_block_parameters(wrappers, trainable_only=False), out / "attention.safetensors",
                                metadata={"format": "lolcats-attention"})
        result["sha256"] = sha256_file(out / "attention.safetensors")
    atomic_write_text(done, json.dumps(result))
    return result


def train(cfg: LolcatsConfig, blocks: list[int] | None = None, progress: Progress | None = None
          ) -> list[dict[str, Any]] | None:
    """Train every block (or ``blocks``); under torchrun each rank takes blocks ``rank, rank + N, …``.

    Returns every block's result on rank 0 (after all ranks finish), None on other ranks.
    """
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    rank, world = distributed.init_from_env(pick_device(cfg.model.device).type)
    try:
        from transformers import AutoConfig

        n_blocks = len(block_ranges(AutoConfig.from_pretrained(resolve_model_path(cfg.model.name_or_path),
                                                               trust_remote_code=cfg.model.trust_remote_code)
                                    .num_hidden_layers, cfg.blockwise.block_size))
        todo = blocks if blocks is not None else list(range(n_blocks))
        mine = todo[rank::world]
        logger.info("rank %d/%d trains blocks %s", rank, world, mine)
        for b in mine:
            train_block(cfg, b, progress)
        distributed.barrier()
        if rank != 0:
            return None
        return [json.loads((block_dir(cfg, b) / "result.json").read_text()) for b in todo]
    finally:
        distributed.shutdown()


def format_summary(results: list[dict[str, Any]]) -> str:
    """Per-block held-out attention MSE before and after training (the paper's Tables 17–18 style)."""
    lines = ["| block | layers | held-out MSE before | after | reduction | steps | minutes |",
             "|---:|---|---:|---:|---:|---:|---:|"]
    for r in results:
        if not r["linearized"]:
            lines.append(f"| {r['block']} | {r['layers'][0]}–{r['layers'][1]} | (no linearized layer) | | | | |")
            continue
        before, after = sum(r["mse_before"]) / len(r["mse_before"]), sum(r["mse_after"]) / len(r["mse_after"])
        lines.append(f"| {r['block']} | {r['layers'][0]}–{r['layers'][1]} | {before:.4g} | {after:.4g} | "
                     f"{before / after:.1f}× | {r['steps']} | {r['seconds'] / 60:.1f} |")
    return "\n".join(lines)
