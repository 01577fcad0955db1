"""``lolcats blockwise train``: each block alone from its stored inputs, one block per process under
torchrun (gloo on CPU, nccl on GPUs); per-block checkpoints, metrics and resume.

A block trains with joint stage 1's engine (:class:`lolcats.distill.AttentionTransfer` and its loss) over a
:class:`LayerRunner`, which feeds the block's layers their stored input hidden states instead of running
the whole model on token ids."""

from __future__ import annotations

import json
import logging
import time
from typing import Any

import torch
from torch import Tensor, nn

from lolcats import distributed
from lolcats.base_model import pick_device
from lolcats.blockwise.common import BlockwiseError, block_dir, block_ranges, hidden_dir, streaming_model
from lolcats.blockwise.shards import HiddenShards
from lolcats.blockwise.streaming import StreamingModel, layer_output
from lolcats.config import LolcatsConfig
from lolcats.convert import TRAINABLE_KEYS, convert_model, linearized_layers
from lolcats.distill import AttentionTransfer
from lolcats.io import append_jsonl, atomic_save_safetensors, atomic_write_text, sha256_file
from lolcats.progress import LogProgress, Progress
from lolcats.sources import resolve_model
from lolcats.training import Trainer

logger = logging.getLogger(__name__)


class LayerRunner:
    """Runs a block's decoder layers on stored hidden states (B, T, D): the block's stage-1 runner
    (joint stage 1 runs the whole model on token ids)."""

    def __init__(self, sm: StreamingModel, layer_ids: range, seq_len: int) -> None:
        self.sm, self.layer_ids = sm, layer_ids
        self.kwargs = sm.layer_inputs(seq_len=seq_len)[1]  # attention mask, rotary cos/sin, positions per layer

    def __call__(self, hidden: Tensor) -> None:
        h = hidden.to(self.sm.device, self.sm.dtype)
        for i in self.layer_ids:
            h = layer_output(self.sm.layers[i](h, **self.kwargs[i]))


def _block_model(cfg: LolcatsConfig, sm: StreamingModel, layer_ids: range) -> AttentionTransfer | None:
    """Materialise ``layer_ids``, convert the model (other layers stay on meta) and wrap the block's
    linearized layers for attention transfer, each weighted 1/L of the whole model's linearized layers;
    None when the block has no linearized layer."""
    for i in layer_ids:
        sm.materialize(sm.layers[i])
    convert_model(sm.model, cfg.attention.training(), seed=cfg.seed)
    linearized = {a.layer_idx for a in linearized_layers(sm.model)}  # L of the whole model
    if not linearized & set(layer_ids):
        return None
    return AttentionTransfer(sm.model, cfg.distill, LayerRunner(sm, layer_ids, cfg.data.seq_len), layer_ids,
                             total_layers=len(linearized))


def _block_parameters(transfer: AttentionTransfer, trainable_only: bool) -> dict[str, nn.Parameter]:
    """Feature maps and window factors of the block's layers, named as in ``attention.safetensors``."""
    return {f"layers.{w.layer_idx}.{n}": p for w in transfer.layers for n, p in w.student.named_parameters()
            if n.startswith(TRAINABLE_KEYS) and (p.requires_grad or not trainable_only)}


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
    train = HiddenShards(root, "train", block, sm.dtype)
    heldout = HiddenShards(root, "heldout", block, sm.dtype)
    transfer = _block_model(cfg, sm, layer_ids)
    result: dict[str, Any] = {"block": block, "layers": [layer_ids.start, layer_ids.stop - 1],
                              "linearized": [w.layer_idx for w in transfer.layers] if transfer else []}
    out.mkdir(parents=True, exist_ok=True)
    if transfer:
        before_path = out / "mse_before.json"
        if not before_path.exists():
            atomic_write_text(before_path, json.dumps(transfer.per_layer_mse(heldout)))

        def log(record: dict) -> None:
            append_jsonl(out / "metrics.jsonl", {"time": round(time.time(), 3), "block": block, **record})

        # each rank trains its own blocks: the loop is not data parallel
        spec = transfer.stage(f"block{block}", _block_parameters(transfer, trainable_only=True), heldout,
                              data_parallel=False)
        bar = progress or LogProgress()
        bar.start(f"block {block}", cfg.distill.steps(len(train)))
        res = Trainer(spec, train, out / "train_state", cfg.seed, log, bar.update).run()
        bar.end()
        result.update(steps=res.steps, tokens=res.tokens, seconds=res.seconds, best_step=res.best_step,
                      mse_before=json.loads(before_path.read_text()), mse_after=transfer.per_layer_mse(heldout))
        atomic_save_safetensors(_block_parameters(transfer, trainable_only=False), out / "attention.safetensors",
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

        n_blocks = len(block_ranges(AutoConfig.from_pretrained(resolve_model(cfg.model.name_or_path),
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
