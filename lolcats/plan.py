"""``lolcats plan RECIPE`` (``lolcats blockwise plan`` is its alias): per stage and per device the memory a run
needs (:mod:`lolcats.memory`), its token budget, and the block-by-block split and disk need
(:mod:`lolcats.blockwise.plan`), from the model config alone: the model is built on the meta device, no weights."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lolcats.blockwise.common import fmt_bytes
from lolcats.blockwise.plan import block_plan, format_plan
from lolcats.config import LolcatsConfig
from lolcats.memory import Shapes, shapes, skeleton, stage_memory

CAPACITY = 80e9  # bytes of the accelerator plan counts for large models (an 80 GB GPU)
STAGES = (("stage1", "stage 1, all layers at once"), ("stage1_block", "stage 1, one block (block by block)"),
          ("stage2", "stage 2 (LoRA)"))


def token_budget(cfg: LolcatsConfig, tokens: int | None = None) -> dict[str, dict[str, Any]]:
    """Optimizer steps and training tokens of each stage: ``max_steps`` × ``grad_accum`` chunks of ``seq_len``, or
    with ``epochs`` passes over ``tokens`` tokens of data (None when the data's size is not given)."""
    seq = cfg.data.seq_len
    chunks = tokens // seq if tokens else None
    out = {}
    for name, loop in (("stage1", cfg.distill), ("stage2", cfg.lora)):
        steps = None if loop.epochs > 0 and chunks is None else loop.steps(chunks or 0)
        out[name] = {"steps": steps, "epochs": loop.epochs, "grad_accum": loop.grad_accum,
                     "tokens": None if steps is None else steps * loop.grad_accum * seq}
    return out


def plan(cfg: LolcatsConfig, tokens: int | None = None, model_config: str | None = None,
         recipe_dir: Path | None = None, devices: int = 1) -> dict[str, Any]:
    """Memory per stage and device, token budget and block-by-block disk of a recipe.

    Args:
        cfg: the recipe.
        tokens: the training data's size in tokens (default ``blockwise.tokens``; without either, a stage given in
            epochs has no token count, and the disk need is counted for the tokens stage 1 reads when it is given in
            ``max_steps``).
        model_config: a config.json (default ``blockwise.model_config``, else the model's folder).
        recipe_dir: where relative ``blockwise.model_config`` paths are looked up when not found from here.
        devices: N, the devices a sharded run (``model.sharding: fsdp``) divides the base over.
    """
    if devices < 1:
        raise ValueError(f"devices={devices} must be 1 or more")
    hf_config, source, model = skeleton(cfg, model_config, recipe_dir)
    s = shapes(cfg, hf_config, model)
    tokens = tokens or cfg.blockwise.tokens or None
    budget = token_budget(cfg, tokens)
    disk_tokens = tokens or (budget["stage1"]["tokens"] if cfg.distill.epochs == 0 else None)
    blocks = block_plan(cfg, hf_config, model, source, disk_tokens)
    biggest = max(blocks["blocks"], key=lambda r: r["base_params"])
    block_layers = biggest["layers"][1] - biggest["layers"][0] + 1
    seq = cfg.data.seq_len
    memory = {}
    for name, stage, loop, layers, base in (("stage1", 1, cfg.distill, None, None),
                                            ("stage1_block", 1, cfg.distill, block_layers, biggest["base_params"]),
                                            ("stage2", 2, cfg.lora, None, None)):
        on = stage_memory(s, stage, seq, True, layers, base)
        off = stage_memory(s, stage, seq, False, layers, base)
        used = on if loop.activation_checkpointing else off
        memory[name] = {"checkpointing": loop.activation_checkpointing, "with_checkpointing": on.to_dict(),
                        "without_checkpointing": off.to_dict(), "per_device": used.sharded(devices).to_dict(),
                        "devices_80gb": used.devices_for(CAPACITY)}
    return {**blocks, "memory": memory, "budget": budget, "devices": devices, "seq_len": seq,
            "dtype": cfg.model.dtype, "shapes": s.to_dict()}


def _params(n: float) -> str:
    return f"{n / 1e9:.2f} B" if n >= 1e9 else f"{n / 1e6:.2f} M"


def _budget(name: str, b: dict[str, Any]) -> str:
    if b["steps"] is None:
        return f"{name} {b['epochs']:g} epochs over the training data (--tokens N, its size, counts them)"
    chunks = "1 chunk" if b["grad_accum"] == 1 else f"{b['grad_accum']} chunks"
    return f"{name} {b['steps']:,} steps × {chunks} = {b['tokens']:,} tokens"


def format_memory(p: dict[str, Any]) -> str:
    """The memory part of :func:`plan` as Markdown."""
    s = Shapes(**p["shapes"])
    n = p["devices"]
    lines = [f"model {p['model']} (config {p['config']}): {s.layers} layers ({s.linearized} linearized), hidden "
             f"{s.hidden}, heads {s.heads}/{s.kv_heads}, vocab {s.vocab}; {_params(s.base_params)} base parameters "
             f"in {p['dtype']}", "",
             f"memory per device, estimated (docs/memory.md): micro-batches of 1 × {p['seq_len']} tokens; * marks the "
             "recipe's activation checkpointing setting", "",
             "| stage | trainable params | weights | gradients | AdamW state | activations: checkpointing / none | "
             "total: checkpointing / none |" + (f" total per device on {n} (sharded) |" if n > 1 else ""),
             "|---|---:|---:|---:|---:|---:|---:|" + ("---:|" if n > 1 else "")]
    for key, label in STAGES:
        m = p["memory"][key]
        on, off = m["with_checkpointing"], m["without_checkpointing"]
        star_on, star_off = ("*", "") if m["checkpointing"] else ("", "*")
        if key == "stage1_block":
            label = f"stage 1, one block of k = {p['block_size']} (block by block)"
        lines.append(f"| {label} | {_params(on['trainable'])} | {fmt_bytes(on['weights'])} | "
                     f"{fmt_bytes(on['gradients'])} | {fmt_bytes(on['optimizer'])} | "
                     f"{fmt_bytes(on['activations'])}{star_on} / {fmt_bytes(off['activations'])}{star_off} | "
                     f"{fmt_bytes(on['total'])}{star_on} / {fmt_bytes(off['total'])}{star_off} |"
                     + (f" {fmt_bytes(m['per_device']['total'])} |" if n > 1 else ""))
    need = p["memory"]["stage2"]["devices_80gb"]
    lines += ["", "stage 2 on 80 GB devices, sharded (model.sharding: fsdp; each device holds its share of the base, "
              "the units it gathers, the trainables, their gradients, AdamW state and activations whole): "
              + ("what every device holds whole does not fit" if need is None else
                                               "fits on one" if need == 1 else f"needs {need}"),
              "not counted: the runtime (Python and torch, a CUDA context: about 0.5 GB per process), the tokenised "
              "data, allocator slack", "",
              "token budget: " + ", ".join(_budget(name, p["budget"][key]) for key, name in
                                           (("stage1", "stage 1"), ("stage2", "stage 2")))]
    return "\n".join(lines)


def format_full(p: dict[str, Any]) -> str:
    """All of :func:`plan`: memory and budget, then the block-by-block split and disk need."""
    return format_memory(p) + "\n\nblock by block:\n" + format_plan(p)

