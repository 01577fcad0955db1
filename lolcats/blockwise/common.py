"""Shared by the block-by-block steps: block split, folders, the streamed model and the data."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from lolcats.base_model import DTYPES, pick_device
from lolcats.blockwise.streaming import StreamingModel
from lolcats.config import LolcatsConfig
from lolcats.sources import resolve_model


class BlockwiseError(RuntimeError):
    """A block-by-block step cannot go on; the message says why and what to do."""


def block_ranges(num_layers: int, block_size: int) -> list[range]:
    """Layers of each block: ``ceil(num_layers / block_size)`` consecutive ranges."""
    return [range(s, min(s + block_size, num_layers)) for s in range(0, num_layers, block_size)]


def disk_bytes(tokens: int, hidden: int, blocks: int, itemsize: int) -> int:
    """Hidden-state disk need: ``itemsize × tokens × hidden × blocks`` (one tensor per block start)."""
    return itemsize * tokens * hidden * blocks


def blockwise_dir(cfg: LolcatsConfig) -> Path:
    return Path(cfg.out_dir).expanduser() / "blockwise"


def hidden_dir(cfg: LolcatsConfig) -> Path:
    return Path(cfg.blockwise.hidden_dir).expanduser() if cfg.blockwise.hidden_dir else blockwise_dir(cfg) / "hidden"


def block_dir(cfg: LolcatsConfig, block: int) -> Path:
    return blockwise_dir(cfg) / f"block-{block:03d}"


def fmt_bytes(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB", "TB", "PB"):
        if n < 1000 or unit == "PB":
            return f"{n:.2f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000
    return f"{n:.2f} PB"


def check_supported(cfg: LolcatsConfig) -> None:
    """What block-by-block stage 1 cannot do yet, refused before anything runs."""
    if cfg.data.max_position_offset:
        raise ValueError(f"data.max_position_offset={cfg.data.max_position_offset}: block-by-block stage 1 stores hidden "
                         "states at positions from 0; set data.max_position_offset=0 for blockwise runs")


def streaming_model(cfg: LolcatsConfig) -> tuple[StreamingModel, str]:
    path = resolve_model(cfg.model.name_or_path)
    if not Path(path).is_dir():
        raise FileNotFoundError(f"block-by-block work reads weights layer by layer from a local folder; "
                                f"{cfg.model.name_or_path} is not one (download it first)")
    device = pick_device(cfg.model.device)
    if device.type == "cuda" and device.index is None and "LOCAL_RANK" in os.environ:
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))  # torchrun: one GPU per process
    return StreamingModel(path, DTYPES[cfg.model.dtype], cfg.model.attn_implementation,
                          cfg.model.trust_remote_code, device), path


def load_data(cfg: LolcatsConfig, path: str):
    from transformers import AutoTokenizer

    from lolcats.data import build_train_data

    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=cfg.model.trust_remote_code)
    d = cfg.data
    return build_train_data(d.train, tokenizer, d.seq_len, d.heldout_chunks, before=d.train_filter,
                            max_train_chunks=d.max_train_chunks)


