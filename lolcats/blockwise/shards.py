"""Stored block-input hidden states: safetensors shards plus a manifest (docs/blockwise.md, precompute).

Layout under the hidden-state folder::

    manifest.json                                   key (what the states depend on) + one entry per shard
    {train,heldout}/block-BBB/shard-GGGGG.safetensors   tensor "hidden" (chunks, seq_len, hidden)

Each manifest entry records the shard's shape, dtype, chunk and token ranges, byte size and file sha256.
Each shard also carries the sha256 of its own tensor bytes in its header, so a deleted manifest is rebuilt
from the shards that still verify. Writes are atomic (temp file + rename), the manifest after every shard.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import Tensor

from lolcats.blockwise.common import fmt_bytes
from lolcats.data import Chunks
from lolcats.io import atomic_save_safetensors, atomic_write_text, fault_scope
from lolcats.io import sha256_file as file_sha256

logger = logging.getLogger(__name__)
MANIFEST = "manifest.json"
FORMAT = 1


class ShardError(RuntimeError):
    """Stored hidden states are missing, corrupt or from another run; the message names the fix."""


def tensor_sha256(t: Tensor) -> str:
    return hashlib.sha256(t.contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()


def shard_name(split: str, block: int, group: int) -> str:
    return f"{split}/block-{block:03d}/shard-{group:05d}.safetensors"


@dataclass
class Group:
    """Consecutive chunks of one split that share shard files (one per block)."""

    split: str
    index: int
    chunks: range
    input_ids: Tensor
    bad: list[int]
    state: Tensor | None = field(default=None, repr=False)

    @property
    def begin(self) -> int:
        """The block whose input this group's recomputation starts from (a verified shard, or block 0)."""
        return max(min(self.bad) - 1, 0) if self.bad else 0

    def shard_bytes(self, hidden: int, itemsize: int) -> int:
        return self.input_ids.numel() * hidden * itemsize


class ShardStore:
    """The manifest and shards of one hidden-state folder.

    Args:
        root: the folder.
        key: what the stored states depend on (model, data, block size, dtype); a manifest with another
            key is refused, naming the first difference.
        dtype: dtype of stored states.
    """

    def __init__(self, root: Path, key: dict[str, Any], dtype: torch.dtype) -> None:
        self.root, self.key, self.dtype = Path(root), json.loads(json.dumps(key)), dtype
        self.problems: list[str] = []
        path = self.root / MANIFEST
        if path.exists():
            manifest = json.loads(path.read_text())
            if manifest.get("key") != self.key:
                diff = _first_difference(manifest.get("key", {}), self.key)
                raise ShardError(f"{self.root} holds hidden states of another run (differs in {diff}); delete the "
                                 "folder or set blockwise.hidden_dir to another one")
            self.shards: dict[str, dict[str, Any]] = manifest["shards"]
        else:
            self.shards = self._rebuild()

    def _rebuild(self) -> dict[str, dict[str, Any]]:
        files = sorted(self.root.glob("*/block-*/shard-*.safetensors"))
        if not files:
            return {}
        msg = (f"manifest {self.root / MANIFEST} is missing: {len(files)} shard files cannot be checked against it; "
               "rebuilding it from the shards' own checksums")
        logger.warning(msg)
        self.problems.append(msg)
        shards = {}
        for f in files:
            name = f.relative_to(self.root).as_posix()
            try:
                with safe_open(str(f), "pt") as handle:
                    meta = json.loads((handle.metadata() or {}).get("lolcats", "{}"))
                    ok = tensor_sha256(handle.get_tensor("hidden")) == meta.pop("tensor_sha256", None)
                entry = meta if ok else None
            except Exception as e:  # noqa: BLE001 (any unreadable file is simply not trusted)
                entry, ok = None, False
                logger.debug("%s unreadable: %s", name, e)
            if ok and entry is not None:
                shards[name] = {**entry, "bytes": f.stat().st_size, "sha256": file_sha256(f)}
            else:
                self.problems.append(f"shard {name} does not verify against its own checksum; recomputing it")
        self._save(shards)
        return shards

    def _save(self, shards: dict[str, dict[str, Any]] | None = None) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.root / MANIFEST, json.dumps({"format": FORMAT, "key": self.key, "shards": shards
                                                            if shards is not None else self.shards}, indent=1))

    # ------------------------------------------------------------------ checking
    def problem(self, name: str) -> str | None:
        return shard_problem(self.root, self.shards, name)

    def groups(self, split: str, chunks: Chunks, blocks: int, per_shard: int) -> list[Group]:
        out = []
        for g, a in enumerate(range(0, len(chunks), per_shard)):
            r = range(a, min(a + per_shard, len(chunks)))
            bad = []
            for b in range(blocks):
                name = shard_name(split, b, g)
                why = self.problem(name)
                if why is not None:
                    bad.append(b)
                    if (self.root / name).exists():
                        self.problems.append(f"{why}; recomputing it")
            out.append(Group(split, g, r, chunks.input_ids[r.start:r.stop], bad))
        return out

    def check_free_space(self, need: int) -> None:
        """Say what will be written, and refuse when the disk cannot hold it."""
        self.root.mkdir(parents=True, exist_ok=True)
        free = shutil.disk_usage(self.root).free
        logger.info("hidden states to write: %s in %s (%s free)", fmt_bytes(need), self.root, fmt_bytes(free))
        if free < need:
            raise ShardError(f"precompute needs {fmt_bytes(need)} for hidden states in {self.root} but only "
                             f"{fmt_bytes(free)} is free; free space or set blockwise.hidden_dir to a larger disk")

    # ------------------------------------------------------------------ reading and writing
    def read(self, group: Group, block: int) -> Tensor:
        with safe_open(str(self.root / shard_name(group.split, block, group.index)), "pt") as handle:
            return handle.get_tensor("hidden").clone()  # never alias the (memory-mapped) file

    def write(self, group: Group, block: int, state: Tensor, layer: int) -> str:
        name = shard_name(group.split, block, group.index)
        path = self.root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        t = state.detach().to(self.dtype).contiguous().cpu()
        seq = t.shape[1]
        entry = {"split": group.split, "block": block, "layer": layer, "group": group.index,
                 "chunks": [group.chunks.start, group.chunks.stop],
                 "tokens": [group.chunks.start * seq, group.chunks.stop * seq],
                 "shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch.")}
        # one metadata key: safetensors writes several in no fixed order, and a repaired shard must be identical
        header = json.dumps({**entry, "tensor_sha256": tensor_sha256(t)}, sort_keys=True)
        with fault_scope(f"shard:{name}"):
            atomic_save_safetensors({"hidden": t}, path, metadata={"lolcats": header})
            self.shards[name] = {**entry, "bytes": path.stat().st_size, "sha256": file_sha256(path)}
            self._save()
        return name


def shard_problem(root: Path, shards: dict[str, dict[str, Any]], name: str) -> str | None:
    """Why shard ``name`` cannot be used (missing, truncated, corrupt), or None when it verifies."""
    entry = shards.get(name)
    path = root / name
    if entry is None:
        return f"shard {name} is not in the manifest" if path.exists() else f"shard {name} is missing"
    if not path.exists():
        return f"shard {name} is missing"
    size = path.stat().st_size
    if size != entry["bytes"]:
        return f"shard {name} is truncated or overwritten ({size} of {entry['bytes']} bytes)"
    if file_sha256(path) != entry["sha256"]:
        return f"shard {name} is corrupt (sha256 differs from the manifest)"
    return None


def _first_difference(a: Any, b: Any, prefix: str = "") -> str:
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b)):
            if a.get(k) != b.get(k):
                return _first_difference(a.get(k), b.get(k), f"{prefix}{k}.")
    return f"{prefix.rstrip('.')}: {a!r} stored vs {b!r} now"


class HiddenShards:
    """One split's stored inputs of one block as training data: item i is ((1, T, hidden), None).

    Every shard is checked against the manifest first; a problem stops with the fix.
    """

    def __init__(self, root: Path, split: str, block: int, dtype: torch.dtype) -> None:
        self.root, self.dtype = Path(root), dtype
        path = self.root / MANIFEST
        if not path.exists():
            raise ShardError(f"no manifest at {path}: run `lolcats blockwise precompute RECIPE` first (it rebuilds a "
                             "deleted manifest from the shards and recomputes any that do not verify)")
        self.shards = json.loads(path.read_text())["shards"]
        entries = sorted(((n, e) for n, e in self.shards.items() if e["split"] == split and e["block"] == block),
                         key=lambda ne: ne[1]["chunks"][0])
        for name, _ in entries:
            why = shard_problem(self.root, self.shards, name)
            if why:
                raise ShardError(f"{why}; rerun `lolcats blockwise precompute RECIPE` to repair it")
        self.entries = entries
        covered = sum(e["chunks"][1] - e["chunks"][0] for _, e in entries)
        if not entries or covered != entries[-1][1]["chunks"][1]:
            raise ShardError(f"the {split} inputs of block {block} are incomplete in {self.root}; rerun "
                             "`lolcats blockwise precompute RECIPE`")
        self.n = covered

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> tuple[Tensor, None]:
        for name, e in self.entries:
            a, b = e["chunks"]
            if a <= i < b:
                with safe_open(str(self.root / name), "pt") as handle:
                    return handle.get_slice("hidden")[i - a:i - a + 1].to(self.dtype), None
        raise IndexError(i)
