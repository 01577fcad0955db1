"""The block-by-block part of ``lolcats plan`` (``lolcats blockwise plan`` is its alias): the block split, disk need
and per-block memory, from the model config alone."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from lolcats.base_model import DTYPES
from lolcats.blockwise.common import block_ranges, disk_bytes, fmt_bytes
from lolcats.config import LolcatsConfig
from lolcats.convert import TRAINABLE_KEYS, find_decoder_layers
from lolcats.memory import skeleton


def plan(cfg: LolcatsConfig, tokens: int | None = None, model_config: str | None = None,
         recipe_dir: Path | None = None) -> dict[str, Any]:
    """The block split, disk need, per-block memory and process count, from the model config alone.

    Args:
        cfg: the recipe.
        tokens: tokens to plan for (default ``blockwise.tokens``).
        model_config: a config.json (default ``blockwise.model_config``, else the model's folder).
        recipe_dir: where relative ``blockwise.model_config`` paths are looked up when not found from here.
    """
    hf_config, source, model = skeleton(cfg, model_config, recipe_dir)
    return block_plan(cfg, hf_config, model, source, tokens or cfg.blockwise.tokens or None)


def block_plan(cfg: LolcatsConfig, hf_config: Any, model: nn.Module, source: str, tokens: int | None) -> dict[str, Any]:
    """:func:`plan` on a converted skeleton (:func:`lolcats.memory.skeleton`); without a token count the disk need
    and precompute's passes are None."""
    layers = find_decoder_layers(model)
    blocks = block_ranges(len(layers), cfg.blockwise.block_size)
    itemsize = DTYPES[cfg.blockwise.shard_dtype].itemsize
    base_bytes = DTYPES[cfg.model.dtype].itemsize
    rows = []
    for b, r in enumerate(blocks):
        base = sum(p.numel() for i in r for n, p in layers[i].named_parameters() if not n.startswith(_trainable_prefixes()))
        train = sum(p.numel() for i in r for n, p in layers[i].named_parameters() if n.startswith(_trainable_prefixes()))
        rows.append({"block": b, "layers": [r.start, r.stop - 1], "base_params": base, "base_bytes": base * base_bytes,
                     "trainable_params": train})
    need = disk_bytes(tokens, hf_config.hidden_size, len(blocks), itemsize) if tokens else None
    chunk_cap = cfg.blockwise.max_inflight_chunks * cfg.data.seq_len
    inflight_tokens = (min(tokens, chunk_cap) if tokens else chunk_cap) if chunk_cap else tokens
    return {"model": cfg.model.name_or_path, "config": str(source), "num_layers": len(layers),
            "hidden_size": hf_config.hidden_size, "block_size": cfg.blockwise.block_size, "blocks": rows,
            "tokens": tokens, "shard_dtype": cfg.blockwise.shard_dtype, "disk_bytes": need,
            "processes": len(blocks), "layer_bytes": rows[0]["base_bytes"] // len(blocks[0]),
            "inflight_bytes": inflight_tokens * hf_config.hidden_size * base_bytes if inflight_tokens else None,
            "waves": -(-tokens // inflight_tokens) if tokens else None}


def _trainable_prefixes() -> tuple[str, ...]:
    return tuple(f"self_attn.{k}" for k in TRAINABLE_KEYS)


def _fmt_count(n: int) -> str:
    return f"{n / 1e9:.3f} B" if n >= 1e9 else f"{n / 1e6:.2f} M"


def format_plan(p: dict[str, Any]) -> str:
    """The block split as Markdown; consecutive blocks of the same size share a row."""
    itemsize = DTYPES[p["shard_dtype"]].itemsize
    lines = [f"model {p['model']} (config {p['config']}): {p['num_layers']} layers, hidden {p['hidden_size']}; "
             f"k = {p['block_size']} -> {len(p['blocks'])} blocks", "",
             "| block | layers | base params | base weights | trainable params |", "|---:|---|---:|---:|---:|"]
    groups: list[list[dict]] = []
    for r in p["blocks"]:
        key = (r["base_params"], r["trainable_params"], r["layers"][1] - r["layers"][0])
        if groups and key == (groups[-1][0]["base_params"], groups[-1][0]["trainable_params"],
                              groups[-1][0]["layers"][1] - groups[-1][0]["layers"][0]):
            groups[-1].append(r)
        else:
            groups.append([r])
    for g in groups:
        r, last = g[0], g[-1]
        blocks = f"{r['block']}" if len(g) == 1 else f"{r['block']}–{last['block']} (each)"
        lines.append(f"| {blocks} | {r['layers'][0]}–{last['layers'][1]} | {_fmt_count(r['base_params'])} | "
                     f"{fmt_bytes(r['base_bytes'])} | {r['trainable_params']:,} |")
    if p["tokens"]:
        lines += ["", f"hidden states on disk: {itemsize} bytes × {p['tokens']:,} tokens × {p['hidden_size']} hidden × "
                  f"{len(p['blocks'])} block starts = {fmt_bytes(p['disk_bytes'])} ({p['shard_dtype']}, decimal units)",
                  f"precompute memory: one layer's weights ({fmt_bytes(p['layer_bytes'])}) plus the hidden states in "
                  f"flight ({fmt_bytes(p['inflight_bytes'])}; {p['waves']} pass(es) over the layers, "
                  "set blockwise.max_inflight_chunks to bound it)"]
    else:
        lines += ["", f"hidden states on disk: {itemsize} bytes × tokens × {p['hidden_size']} hidden × "
                  f"{len(p['blocks'])} block starts (give the token count: --tokens N or blockwise.tokens)"]
    lines.append(f"train step: up to {p['processes']} processes/GPUs, one block each "
                 "(torchrun --nproc_per_node N -m lolcats.cli blockwise train RECIPE)")
    return "\n".join(lines)
