"""File helpers every writer shares: atomic writes, sha256, JSONL, and the fault points tests use.

Every file the toolkit writes goes through here, so three guarantees hold in one place:

* a file is written to a temporary name in its own folder and renamed into place, so an
  interrupted write never leaves a half-written file under the real name;
* new files get the permissions of an ordinary file under the process umask (``0o666 & ~umask``,
  ``0o777 & ~umask`` for folders), whatever the library that wrote them chose;
* each write passes named *fault points* (:func:`fault_point`): no-ops unless a test installed a
  hook with :func:`set_fault_hook`, which is how the kill-9 tests stop a process inside a write.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from torch import Tensor

FaultHook = Callable[[str], object]
_hook: FaultHook | None = None
_scope: list[str] = []


def set_fault_hook(hook: FaultHook | None) -> None:
    """Install (or remove, with None) the function called at every fault point with the point's key."""
    global _hook
    _hook = hook


@contextlib.contextmanager
def fault_scope(name: str) -> Iterator[None]:
    """Prefix the keys of the fault points passed inside the block, e.g. ``stage1@3``."""
    _scope.append(name)
    try:
        yield
    finally:
        _scope.pop()


def fault_point(name: str) -> bool:
    """A place where a test may stop the process; its key is ``<scope>/<name>`` (scope innermost last).

    Returns what the hook returns, as a bool (a hook may ask for a fault such as a non-finite loss)."""
    return bool(_hook("/".join([*_scope, name]))) if _hook is not None else False


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def honour_umask(path: Path) -> None:
    """Give ``path`` (a file or a folder tree) the permissions of an ordinary new file under the umask."""
    mask = _umask()
    path = Path(path)
    if path.is_dir():
        path.chmod(0o777 & ~mask)
        for p in path.rglob("*"):
            p.chmod((0o777 if p.is_dir() else 0o666) & ~mask)
    else:
        path.chmod(0o666 & ~mask)


def _tmp(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp")


def _commit(tmp: Path, path: Path) -> None:
    honour_umask(tmp)
    fault_point(f"write:{path.name}:before-rename")
    os.replace(tmp, path)
    fault_point(f"write:{path.name}:after-rename")


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and a rename."""
    path = Path(path)
    tmp = _tmp(path)
    fault_point(f"write:{path.name}:begin")
    with open(tmp, "w", encoding="utf-8") as f:
        half = len(text) // 2
        f.write(text[:half])
        f.flush()
        fault_point(f"write:{path.name}:half")
        f.write(text[half:])
    _commit(tmp, path)


def atomic_save_safetensors(tensors: dict[str, Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    """Save tensors as one safetensors file through a temporary file and a rename."""
    from safetensors.torch import save_file

    if metadata and len(metadata) > 1:
        # safetensors writes several metadata keys in no fixed order: the same tensors would give other bytes,
        # and a resumed run must write the very file an uninterrupted one writes
        raise ValueError(f"{path.name}: pass at most one metadata key (e.g. JSON text), got {sorted(metadata)}")
    path = Path(path)
    tmp = _tmp(path)
    fault_point(f"write:{path.name}:begin")
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp), metadata=metadata)
    _commit(tmp, path)


def atomic_write_dir(path: Path, fill: Callable[[Path], Any]) -> None:
    """Build a folder with ``fill(tmp_folder)`` and rename it into place (replacing ``path``)."""
    path = Path(path)
    tmp = _tmp(path)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    fault_point(f"write:{path.name}/:begin")
    fill(tmp)
    honour_umask(tmp)
    fault_point(f"write:{path.name}/:before-rename")
    old = path.with_name(f".{path.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if path.exists():
        os.replace(path, old)
    os.replace(tmp, path)
    shutil.rmtree(old, ignore_errors=True)
    fault_point(f"write:{path.name}/:after-rename")


def append_jsonl(path: Path, record: dict[str, Any]) -> None:
    """Append one JSON object as a line (metrics logs)."""
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")


def sha256_file(path: Path) -> str:
    """sha256 of a file's bytes, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def sha256_tree(folder: Path, names: list[str] | None = None) -> dict[str, str]:
    """sha256 of each file under ``folder`` (relative posix names), or of ``names`` only."""
    folder = Path(folder)
    files = [folder / n for n in names] if names is not None else sorted(p for p in folder.rglob("*") if p.is_file())
    return {p.relative_to(folder).as_posix(): sha256_file(p) for p in files}


def release_freed_memory() -> None:
    """glibc keeps freed heap for reuse; ``malloc_trim`` returns it to the OS (no-op elsewhere)."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    if name:
        libc = ctypes.CDLL(name)
        if hasattr(libc, "malloc_trim"):
            libc.malloc_trim(0)
