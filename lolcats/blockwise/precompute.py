"""``lolcats blockwise precompute``: one teacher pass, streaming the model one layer at a time, that writes
the hidden states entering every block (see :mod:`lolcats.blockwise.shards` for the files)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lolcats.base_model import DTYPES
from lolcats.blockwise.common import block_ranges, hidden_dir, load_data, streaming_model
from lolcats.blockwise.shards import Group, ShardStore
from lolcats.blockwise.streaming import StreamingModel, layer_output
from lolcats.config import LolcatsConfig
from lolcats.io import fault_point, release_freed_memory
from lolcats.progress import LogProgress, Progress


@dataclass
class PrecomputeResult:
    hidden_dir: Path
    written: list[str]
    verified: int
    problems: list[str]
    peak_param_bytes: int
    inflight_bytes: int
    seconds: float


def _param_bytes(module: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters() if not p.is_meta)


@torch.no_grad()
def precompute(cfg: LolcatsConfig, progress: Progress | None = None) -> PrecomputeResult:
    """Write every block start's input hidden states; verified shards are kept, bad ones rewritten."""
    start = time.perf_counter()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    sm, path = streaming_model(cfg)
    train, heldout = load_data(cfg, path)
    release_freed_memory()  # tokenising the corpus leaves freed heap behind; hand it back before the pass
    blocks = block_ranges(len(sm.layers), cfg.blockwise.block_size)
    store = ShardStore(hidden_dir(cfg), _store_key(cfg, sm, len(train), len(heldout)),
                       DTYPES[cfg.blockwise.shard_dtype])
    groups = [g for split, chunks in (("train", train), ("heldout", heldout))
              for g in store.groups(split, chunks, len(blocks), cfg.blockwise.chunks_per_shard)]
    todo = [g for g in groups if g.bad]
    verified = sum(len(blocks) - len(g.bad) for g in groups)
    if not todo:
        return PrecomputeResult(store.root, [], verified, store.problems, 0, 0, time.perf_counter() - start)
    store.check_free_space(sum(g.shard_bytes(sm.config.hidden_size, store.dtype.itemsize) * len(g.bad) for g in todo))
    _, kwargs = sm.layer_inputs(seq_len=cfg.data.seq_len)
    waves = _waves(todo, cfg.blockwise.max_inflight_chunks)
    spans = [(min(g.begin for g in w), max(max(g.bad) for g in w)) for w in waves]
    bar = progress or LogProgress()
    bar.start("precompute", sum(blocks[b].start - blocks[a].start for a, b in spans), unit="layer")
    stats = _Stats()
    for wave in waves:
        _run_wave(sm, store, blocks, wave, kwargs, stats, bar)
    bar.end()
    return PrecomputeResult(store.root, stats.written, verified, store.problems, stats.peak, stats.inflight,
                            time.perf_counter() - start)


@dataclass
class _Stats:
    written: list[str] = field(default_factory=list)
    peak: int = 0  # largest materialised module, bytes
    inflight: int = 0  # most hidden-state bytes held at once
    tokens: int = 0
    layers: int = 0


def _waves(groups: list[Group], limit: int) -> list[list[Group]]:
    """Split groups into waves of at most ``limit`` chunks (whole groups; 0 = one wave)."""
    if limit <= 0:
        return [groups]
    waves: list[list[Group]] = [[]]
    for g in groups:
        if waves[-1] and sum(len(x.chunks) for x in waves[-1]) + len(g.chunks) > limit:
            waves.append([])
        waves[-1].append(g)
    return waves


def _run_wave(sm: StreamingModel, store: ShardStore, blocks: list[range], todo: list[Group],
              kwargs: list[dict[str, Any]], stats: _Stats, bar: Progress) -> None:
    """One pass over the layers for ``todo``: each group starts from its last verified shard (or the
    embeddings), advances layer by layer, and writes its bad shards as it reaches them."""
    starts = {r.start: b for b, r in enumerate(blocks)}
    embed = sm.model.get_input_embeddings()
    first = min(g.begin for g in todo)
    last = max(max(g.bad) for g in todo)
    for i in range(blocks[first].start, blocks[last].start + 1):
        if i in starts:
            b = starts[i]
            for g in todo:
                if g.begin == b:
                    if b in g.bad:  # only block 0 can be a group's first block and bad: embed the tokens
                        sm.materialize(embed)
                        stats.peak = max(stats.peak, _param_bytes(embed))
                        g.state = torch.empty(*g.input_ids.shape, sm.config.hidden_size, dtype=sm.dtype)
                        for c in range(len(g.input_ids)):
                            g.state[c:c + 1] = sm.layer_inputs(input_ids=g.input_ids[c:c + 1])[0].cpu()
                        sm.release(embed)
                    else:
                        g.state = store.read(g, b).to(sm.dtype)
                if g.state is None:
                    continue
                for c in range(len(g.state)):  # what is stored is what flows on (rounded chunk by chunk, in place)
                    g.state[c] = g.state[c].to(store.dtype)
                if b in g.bad:
                    stats.written.append(store.write(g, b, g.state, layer=i))
                if b == max(g.bad):
                    g.state = None
            stats.inflight = max(stats.inflight, sum(g.state.numel() * g.state.element_size() for g in todo
                                                     if g.state is not None))
            if i == blocks[last].start:
                break
        active = [g for g in todo if g.state is not None]
        if not active:
            continue
        fault_point(f"precompute:layer{i}")
        layer = sm.materialize(sm.layers[i])
        stats.peak = max(stats.peak, _param_bytes(layer))
        for g in active:  # states stay in host memory; one chunk at a time visits the device
            for c in range(g.state.shape[0]):
                g.state[c:c + 1] = layer_output(layer(g.state[c:c + 1].to(sm.device), **kwargs[i])).to(g.state.device)
            stats.tokens += g.state.shape[0] * g.state.shape[1]
        sm.release(layer)
        stats.layers += 1
        bar.update(stats.layers, stats.tokens, {"layer": i})


def _store_key(cfg: LolcatsConfig, sm: StreamingModel, n_train: int, n_heldout: int) -> dict[str, Any]:
    """What the stored hidden states depend on; a manifest with another key belongs to another run."""
    files = sorted((f.name, f.stat().st_size) for f in sm.path.glob("*.safetensors"))
    return {"model": cfg.model.name_or_path, "checkpoint_files": files, "dtype": cfg.model.dtype,
            "attn_implementation": cfg.model.attn_implementation, "num_layers": len(sm.layers),
            "block_size": cfg.blockwise.block_size, "shard_dtype": cfg.blockwise.shard_dtype,
            "chunks_per_shard": cfg.blockwise.chunks_per_shard, "data": {
                "train": cfg.data.train, "train_filter": cfg.data.train_filter, "seq_len": cfg.data.seq_len,
                "heldout_chunks": cfg.data.heldout_chunks, "train_chunks": n_train, "heldout": n_heldout}}
