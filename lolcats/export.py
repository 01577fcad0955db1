"""``lolcats export``: one self-contained merged model from an out_dir; ``lolcats verify``: every file of an
out_dir or export against the sha256 recorded when it was written."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from lolcats.checkpoint import CONFIG_FILE, CheckpointError, load, read_run_config, verify_files, write_run_config
from lolcats.io import atomic_write_dir, sha256_tree
from lolcats.sources import resolve_model


def verify_export(folder: str | os.PathLike) -> int:
    """Check every file of an out_dir or export against the sha256 recorded when it was written.

    Returns the number of files verified; raises CheckpointError naming the first that differs."""
    folder = Path(folder).expanduser()
    record = read_run_config(folder)
    if record is None:
        raise FileNotFoundError(f"{folder} has no {CONFIG_FILE}; it is not a lolcats out_dir or export")
    files = record.get("files")
    if not files:
        raise CheckpointError(f"{folder} records no checksums (written by lolcats format "
                              f"{record['format_version']}, or unfinished); nothing can be verified")
    verify_files(folder, files)
    return len(files)


def export_merged(out_dir: str | os.PathLike, to: str | os.PathLike, trust_remote_code: bool = False) -> Path:
    """Write one self-contained model: base weights with LoRA merged plus attention weights; its
    ``lolcats_config.json`` records every file's sha256 (``lolcats verify DEST`` checks them)."""
    out, dest = Path(out_dir).expanduser(), Path(to).expanduser()
    if dest.exists() and not dest.is_dir():
        raise FileExistsError(f"--to {dest} is an existing file; choose a new folder")
    if dest.exists() and any(dest.iterdir()):
        raise FileExistsError(f"--to {dest} exists and is not empty; choose a new folder")
    if not dest.parent.exists():
        raise FileNotFoundError(f"--to {dest}: its parent folder {dest.parent} does not exist; create it first")
    record = read_run_config(out)
    if record is None:
        raise FileNotFoundError(f"{out} has no {CONFIG_FILE}; export takes a lolcats out_dir")
    if record.get("status") != "complete":
        raise CheckpointError(f"{out} holds an unfinished run (status {record.get('status')!r}); rerun "
                              "`lolcats linearize` on it to finish before exporting")
    model = load(out, device="cpu", trust_remote_code=trust_remote_code)
    if hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
    base = Path(resolve_model(record["base_model"]["name_or_path"]))
    tokenizer_files = [f for f in base.glob("*")
                       if f.name.startswith(("tokenizer", "special_tokens", "chat_template", "generation_config"))]

    def fill(tmp: Path) -> None:
        model.save_pretrained(tmp)
        for f in tokenizer_files:
            shutil.copy2(f, tmp / f.name)
        kept = {k: v for k, v in record.items() if k not in ("format", "format_version", "files")}
        write_run_config(tmp, kept | {"merged": True, "files": sha256_tree(tmp)})

    if dest.exists():
        dest.rmdir()
    atomic_write_dir(dest, fill)
    return dest
