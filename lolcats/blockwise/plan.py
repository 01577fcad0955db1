"""``lolcats blockwise plan``: the block split, disk need and per-block memory, from the model config alone."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from lolcats.base_model import DTYPES
from lolcats.blockwise.common import block_ranges, disk_bytes, fmt_bytes
from lolcats.config import LolcatsConfig
from lolcats.convert import TRAINABLE_KEYS, convert_model, find_decoder_layers
from lolcats.sources import resolve_model


def plan(cfg: LolcatsConfig, tokens: int | None = None, model_config: str | None = None,
         recipe_dir: Path | None = None) -> dict[str, Any]:
    """The block split, disk need, per-block memory and process count, from the model config alone.

    Args:
        cfg: the recipe.
        tokens: tokens to plan for (default ``blockwise.tokens``).
        model_config: a config.json (default ``blockwise.model_config``, else the model's folder).
        recipe_dir: where relative ``blockwise.model_config`` paths are looked up when not found from here.
    """
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    source = model_config or cfg.blockwise.model_config
    if source and not Path(source).expanduser().exists() and recipe_dir is not None:
        source = str(recipe_dir / source)
    source = source or resolve_model(cfg.model.name_or_path)
    path = Path(source).expanduser()
    if path.is_file():
        hf_config = AutoConfig.from_pretrained(str(path.parent) if path.name == "config.json" else str(path),
                                               trust_remote_code=cfg.model.trust_remote_code)
    elif (path / "config.json").exists():
        hf_config = AutoConfig.from_pretrained(str(path), trust_remote_code=cfg.model.trust_remote_code)
    else:
        raise FileNotFoundError(f"no model config at {source}; set blockwise.model_config to a local config.json "
                                "(plan needs only the config, never the weights)")
    with init_empty_weights(), torch.device("meta"):  # shapes only: nothing is allocated or initialised
        model = AutoModelForCausalLM.from_config(hf_config, trust_remote_code=cfg.model.trust_remote_code)
        convert_model(model, cfg.attention)
    layers = find_decoder_layers(model)
    blocks = block_ranges(len(layers), cfg.blockwise.block_size)
    itemsize = DTYPES[cfg.blockwise.shard_dtype].itemsize
    base_bytes = DTYPES[cfg.model.dtype].itemsize
    tokens = tokens or cfg.blockwise.tokens
    if not tokens:
        raise ValueError("plan needs a token count: set blockwise.tokens in the recipe or pass --tokens")
    rows = []
    for b, r in enumerate(blocks):
        base = sum(p.numel() for i in r for n, p in layers[i].named_parameters() if not n.startswith(_trainable_prefixes()))
        train = sum(p.numel() for i in r for n, p in layers[i].named_parameters() if n.startswith(_trainable_prefixes()))
        rows.append({"block": b, "layers": [r.start, r.stop - 1], "base_params": base, "base_bytes": base * base_bytes,
                     "trainable_params": train})
    need = disk_bytes(tokens, hf_config.hidden_size, len(blocks), itemsize)
    chunk_cap = cfg.blockwise.max_inflight_chunks * cfg.data.seq_len
    inflight_tokens = min(tokens, chunk_cap) if chunk_cap else tokens
    return {"model": cfg.model.name_or_path, "config": str(source), "num_layers": len(layers),
            "hidden_size": hf_config.hidden_size, "block_size": cfg.blockwise.block_size, "blocks": rows,
            "tokens": tokens, "shard_dtype": cfg.blockwise.shard_dtype, "disk_bytes": need,
            "processes": len(blocks), "layer_bytes": rows[0]["base_bytes"] // len(blocks[0]),
            "inflight_bytes": inflight_tokens * hf_config.hidden_size * base_bytes,
            "waves": -(-tokens // inflight_tokens)}


def _trainable_prefixes() -> tuple[str, ...]:
    return tuple(f"self_attn.{k}" for k in TRAINABLE_KEYS)


def _fmt_count(n: int) -> str:
    return f"{n / 1e9:.3f} B" if n >= 1e9 else f"{n / 1e6:.2f} M"


def format_plan(p: dict[str, Any]) -> str:
    itemsize = DTYPES[p["shard_dtype"]].itemsize
    lines = [f"model {p['model']} (config {p['config']}): {p['num_layers']} layers, hidden {p['hidden_size']}; "
             f"k = {p['block_size']} -> {len(p['blocks'])} blocks", "",
             "| block | layers | base params | base weights | trainable params |", "|---:|---|---:|---:|---:|"]
    for r in p["blocks"]:
        lines.append(f"| {r['block']} | {r['layers'][0]}–{r['layers'][1]} | {_fmt_count(r['base_params'])} | "
                     f"{fmt_bytes(r['base_bytes'])} | {r['trainable_params']:,} |")
    lines += ["", f"hidden states on disk: {itemsize} bytes × {p['tokens']:,} tokens × {p['hidden_size']} hidden × "
              f"{len(p['blocks'])} block starts = {fmt_bytes(p['disk_bytes'])} ({p['shard_dtype']}, decimal units)",
              f"precompute memory: one layer's weights ({fmt_bytes(p['layer_bytes'])}) plus the hidden states in "
              f"flight ({fmt_bytes(p['inflight_bytes'])}; {p['waves']} pass(es) over the layers, "
              "set blockwise.max_inflight_chunks to bound it)",
              f"train step: up to {p['processes']} processes/GPUs, one block each "
              f"(torchrun --nproc_per_node N -m lolcats.cli blockwise train RECIPE)"]
    return "\n".join(lines)
