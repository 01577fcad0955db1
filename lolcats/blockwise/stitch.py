"""``lolcats blockwise stitch``: every block's weights into one ``attention.safetensors``, then stage 2."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from torch import Tensor

from lolcats import distributed
from lolcats.base_model import pick_device
from lolcats.blockwise.common import BlockwiseError, blockwise_dir, streaming_model
from lolcats.checkpoint import ATTENTION_FILE, attention_state, check_finite, read_safetensors, verify_files
from lolcats.config import LolcatsConfig
from lolcats.convert import convert_model
from lolcats.io import atomic_save_safetensors, sha256_file
from lolcats.run_dir import mark_stage_done, stage_done_path

logger = logging.getLogger(__name__)


def _layer(name: str) -> int:
    return int(name.split(".")[1])


def merge_blocks(cfg: LolcatsConfig) -> tuple[dict[str, Tensor], list[dict[str, Any]]]:
    """Every finished block's tensors, checked against the converted model's expected names and shapes.

    Raises:
        BlockwiseError: a layer is missing (naming the block to train), duplicated across blocks
            (naming both), unexpected, or of another shape.
    """
    sm, _ = streaming_model(cfg)
    convert_model(sm.model, cfg.attention, seed=cfg.seed)  # on the meta device: names and shapes only
    expected = {n: tuple(t.shape) for n, t in attention_state(sm.model).items()}
    merged: dict[str, Tensor] = {}
    owner: dict[int, str] = {}
    results = []
    for folder in sorted(blockwise_dir(cfg).glob("block-*")):
        if not (folder / "result.json").exists():
            continue
        result = json.loads((folder / "result.json").read_text())
        results.append(result)
        f = folder / "attention.safetensors"
        if "sha256" in result:  # the block's weights as training wrote them
            verify_files(folder, {f.name: result["sha256"]})
        tensors = read_safetensors(f) if f.exists() else {}
        check_finite(tensors, f)
        for name, t in tensors.items():
            layer = _layer(name)
            if owner.get(layer, folder.name) != folder.name:
                raise BlockwiseError(f"layer {layer} is duplicated: both {owner[layer]} and {folder.name} hold its "
                                     f"weights; delete the stale block folder under {blockwise_dir(cfg)}")
            owner[layer] = folder.name
            if name not in expected:
                raise BlockwiseError(f"{f} holds {name}, which the converted model does not have; it was trained "
                                     "with another recipe")
            if tuple(t.shape) != expected[name]:
                raise BlockwiseError(f"{f}: {name} has shape {tuple(t.shape)} but the model expects {expected[name]}")
            merged[name] = t
    missing = sorted({_layer(n) for n in set(expected) - set(merged)})
    if missing:
        k = cfg.blockwise.block_size
        blocks = sorted({i // k for i in missing})
        raise BlockwiseError(f"layers {', '.join(map(str, missing))} have no trained weights (block(s) "
                             f"{', '.join(map(str, blocks))} not finished); run `lolcats blockwise train RECIPE`")
    return merged, sorted(results, key=lambda r: r["block"])


def stitch(cfg: LolcatsConfig, progress: Any = None):
    """Merge the blocks into ``out_dir/attention.safetensors`` and finish the run (stage 2, report) as
    ``lolcats linearize`` does, which then sees stage 1 as done. Returns the pipeline's RunResult."""
    from lolcats.pipeline import linearize

    distributed.init_from_env(pick_device(cfg.model.device).type)  # under torchrun, stage 2 is data-parallel
    merged, results = merge_blocks(cfg)
    out = Path(cfg.out_dir).expanduser()
    if not stage_done_path(out, "stage1").exists() and distributed.is_main():
        atomic_save_safetensors(merged, out / ATTENTION_FILE, metadata={"format": "lolcats-attention"})
        trained = [r for r in results if r["linearized"]]
        summary = {"trainable": sum(t.numel() for t in merged.values()), "blockwise": True,
                   "blocks": len(results), "steps": max((r["steps"] for r in trained), default=0),
                   "tokens": sum(r["tokens"] for r in trained), "seconds": sum(r["seconds"] for r in trained),
                   "best_step": -1, "best_eval": float("nan"), "sha256": sha256_file(out / ATTENTION_FILE)}
        mark_stage_done(out, "stage1", summary)
        logger.info("stitched %d tensors from %d blocks into %s", len(merged), len(results), out / ATTENTION_FILE)
    distributed.barrier()
    return linearize(cfg, progress=progress)
