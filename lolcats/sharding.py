"""Sharded training with FSDP2 (``model.sharding: fsdp``; docs/design.md §3).

Under torchrun or ``accelerate launch`` every rank builds the base model on the meta device, shards each
decoder layer and then the rest (embeddings, final norm, head) over the ranks with
:func:`torch.distributed.fsdp.fully_shard`, and reads only its own rows of every weight from the checkpoint's
safetensors: no rank ever holds the whole model. A layer's weights are gathered for its forward (and backward)
pass and freed after it.

What lolcats adds after loading (feature maps, window factors, decays, LoRA adapters) is small and stays whole on
every rank, outside FSDP's units, and trains data-parallel as without sharding (each rank takes its share of an
optimizer step's micro-batches, gradients summed): checkpoints, resume and the out_dir are a single process's.

A forward pass of a sharded model is a collective: every rank must run it, in the same order. The pipeline runs
every measurement on all ranks (the same numbers) and rank 0 writes.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from lolcats import distributed
from lolcats.attention import find_decoder_layers
from lolcats.base_model import DTYPES, base_config, pick_device
from lolcats.blockwise.streaming import TensorIndex
from lolcats.config import ModelConfig

logger = logging.getLogger(__name__)

STATS_ENV = "LOLCATS_SHARDING_STATS"  # a file path: each rank appends its parameter bytes there (diagnostics, tests)


def requested(cfg: ModelConfig) -> bool:
    """The recipe asks for sharding and there is more than one process to shard over."""
    if cfg.sharding != "fsdp":
        return False
    if distributed.world()[1] < 2:
        logger.info("model.sharding=fsdp in a single process: nothing to shard, the model loads whole")
        return False
    return True


def _held_bytes(slots: list[tuple[nn.Module, str]]) -> int:
    """Bytes of the base parameters in ``slots`` (module, attribute) this rank holds now: a sharded one's local
    rows, a gathered one whole."""
    from torch.distributed.tensor import DTensor

    total, seen = 0, set()
    for module, name in slots:
        p = getattr(module, name)
        if id(p) in seen:
            continue
        seen.add(id(p))
        t = p.to_local() if isinstance(p, DTensor) else p
        total += t.numel() * t.element_size()
    return total


@dataclass
class ShardedBase:
    """A base model sharded over the ranks, and where its weights came from.

    Attributes:
        model: the model; its parameters are DTensors sharded on their first dimension.
        class_name: the model's class (FSDP gives the model a subclass of it).
        index: the checkpoint's tensors by name.
        sources: each parameter name's tensor in the checkpoint (a tied head's is the embedding's).
        local_bytes: bytes of the rows this rank holds.
        full_bytes: bytes of the whole model's parameters.
        peak_bytes: the most base-weight bytes this rank held at the start of a decoder layer's forward or
            backward pass (measured only with ``LOLCATS_SHARDING_STATS`` set).
    """

    model: nn.Module
    class_name: str
    index: TensorIndex
    sources: dict[str, str]
    local_bytes: int
    full_bytes: int
    peak_bytes: int = 0
    _hooks: list[Any] = field(default_factory=list)

    def head(self, name: str, n: int) -> Tensor:
        """The first ``n`` elements of parameter ``name`` (flattened, in the model's dtype), read from the
        checkpoint: the base's fingerprint without gathering a sharded weight."""
        source = self.sources[name]
        shape = self.index.shape(source)
        row = 1
        for s in shape[1:]:
            row *= s
        rows = min(shape[0], -(-n // row)) if shape else 0
        t = self.index.rows(source, 0, rows) if shape else self.index.load([source])[source]
        dtype = dict(self.model.named_parameters(remove_duplicate=False))[name].dtype
        return t.to(dtype).flatten()[:n]

    def watch(self) -> None:
        """Record the parameter bytes held at the start of every decoder layer's forward and backward pass."""
        slots = [(module, name) for module in self.model.modules() for name, _ in module.named_parameters(recurse=False)]

        def note(*_: Any) -> None:  # base weights only: the modules stay, whatever lolcats wraps around them later
            self.peak_bytes = max(self.peak_bytes, _held_bytes(slots))

        import warnings

        # a frozen layer's inputs need no gradient in stage 1: its backward hook then fires on its outputs' (fine)
        warnings.filterwarnings("ignore", message="Full backward hook is firing when gradients are computed with "
                                "respect to module outputs")
        for layer in find_decoder_layers(self.model):
            self._hooks.append(layer.register_forward_pre_hook(note))
            self._hooks.append(layer.register_full_backward_pre_hook(note))

    def write_stats(self, path: str | Path) -> None:
        rank, world = distributed.world()
        record = {"rank": rank, "world": world, "local_bytes": self.local_bytes, "full_bytes": self.full_bytes,
                  "peak_bytes": self.peak_bytes}
        with open(path, "a") as f:
            f.write(json.dumps(record) + "\n")


def _sources(model: nn.Module, index: TensorIndex) -> dict[str, str]:
    """Each parameter's name in the checkpoint: its own, or that of a parameter it is tied to."""
    aliases: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        aliases.setdefault(id(p), []).append(name)
    out = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        found = [a for a in aliases[id(p)] if a in index.where]
        if not found:
            raise ValueError(f"{index.folder}: tensor {name!r} is not in the checkpoint; sharded loading reads "
                             "tensors under the model's own parameter names (re-save the model with "
                             "save_pretrained, or set model.sharding: none)")
        out[name] = found[0]
    return out


def _rows(n: int, rank: int, world: int) -> tuple[int, int]:
    """The rows of a first dimension of ``n`` that FSDP's even sharding gives ``rank`` (torch.chunk's split)."""
    per = -(-n // world)
    start = min(rank * per, n)
    return start, min(start + per, n)


def load_sharded(cfg: ModelConfig) -> ShardedBase:
    """The recipe's base model, sharded over the launcher's ranks (its process group must exist): built on the
    meta device, one FSDP unit per decoder layer and one for the rest, and filled with this rank's rows of each
    weight read from the checkpoint's safetensors. In eval mode, every weight frozen."""
    from accelerate import init_empty_weights
    from safetensors import safe_open
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor
    from transformers import AutoModelForCausalLM

    path, hf_config = base_config(cfg)
    rank, world = distributed.world()
    device = pick_device(cfg.device)
    if device.type == "cuda":
        device = torch.device("cuda", torch.cuda.current_device())
    index = TensorIndex(Path(path))
    with init_empty_weights(include_buffers=False):  # parameters on meta; buffers (rotary frequencies) real
        model = AutoModelForCausalLM.from_config(hf_config, dtype=DTYPES[cfg.dtype],
                                                 attn_implementation=cfg.attn_implementation,
                                                 trust_remote_code=cfg.trust_remote_code)
    model.tie_weights()  # outside init_empty_weights, which would make the tied head a tensor of its own
    model.eval().requires_grad_(False)
    sources = _sources(model, index)
    class_name = type(model).__name__
    buffers = {n: b.detach().clone() for n, b in model.named_buffers()}
    mesh = init_device_mesh(device.type, (world,))
    for layer in find_decoder_layers(model):
        fully_shard(layer, mesh=mesh)
    # the rest too frees its gathered weights after each pass: every rank is then back to its shards between
    # passes, so what rank 0 alone does between them (reading a state dict to save adapters) changes no rank's state
    fully_shard(model, mesh=mesh, reshard_after_forward=True)
    model.to_empty(device=device)  # this rank's rows only; what they hold is read below
    local = full = 0
    with torch.no_grad():
        own = dict(model.named_buffers())
        for n, b in buffers.items():
            own[n].copy_(b)
        by_file: dict[Path, list[tuple[str, nn.Parameter]]] = {}
        for name, p in model.named_parameters():
            by_file.setdefault(index.where[sources[name]], []).append((name, p))
        for f, params in by_file.items():
            with safe_open(str(f), "pt") as handle:  # each file opened once, each weight read as this rank's rows
                for name, p in params:
                    shard = p.to_local() if isinstance(p, DTensor) else p
                    start, end = _rows(p.shape[0], rank, world) if isinstance(p, DTensor) else (0, p.shape[0])
                    if shard.shape[0] != end - start:
                        raise RuntimeError(f"{name}: FSDP gave rank {rank} {shard.shape[0]} rows, not rows "
                                           f"{start}–{end}; this torch shards otherwise than lolcats reads (please report it)")
                    if shard.numel():
                        shard.copy_(index.rows(sources[name], start, end, handle=handle))
                    local += shard.numel() * shard.element_size()
                    full += p.numel() * p.element_size()
    logger.info("rank %d of %d holds %.1f of the base's %.1f MB (sharded, FSDP2)", rank, world, local / 1e6, full / 1e6)
    base = ShardedBase(model, class_name, index, sources, local, full)
    if os.environ.get(STATS_ENV):
        base.watch()
    return base
