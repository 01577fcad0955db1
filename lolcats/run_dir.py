"""The out_dir of a run being written: what ``--overwrite`` may delete, whether a rerun resumes,
restarts or is refused, and the markers of finished stages with the checksums of their results.

Everything here decides from files alone and writes nothing until :func:`apply_out_dir_plan`, which
the pipeline calls once the recipe, the data and the base model have all been checked.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

from lolcats.checkpoint import (
    ADAPTER_DIR,
    ADAPTER_WEIGHTS,
    ATTENTION_FILE,
    CONFIG_FILE,
    FORMAT_VERSION,
    CheckpointError,
    is_run_dir,
    read_run_config,
    verify_files,
)
from lolcats.config import LolcatsConfig
from lolcats.io import atomic_write_text

logger = logging.getLogger(__name__)
REPORT_FILE = "report.md"
LAYER_CHOICE_FILE = "layer_choice.json"  # the softmax-layer ranking (attention.softmax_layers), see lolcats.layer_choice
STAGES = {"stage1": ATTENTION_FILE, "stage2": ADAPTER_WEIGHTS}  # each stage's result file


# settings of how a stage computes, not of what it computes (same weights either way): like ``threads``, a
# resumed run may change them, e.g. to fit in memory
HOW_NOT_WHAT = {"model": ("sharding",), "distill": ("activation_checkpointing",), "lora": ("activation_checkpointing",)}


def _comparable(cfg: dict[str, Any]) -> dict[str, Any]:
    """The config a resumed run must share; the base itself is compared by fingerprint, not by name. Keys a
    later lolcats added are filled with their defaults, which keep the older behaviour; softmax layers the layer
    choice derived after stage 1 (``attention.skip_layers_chosen``) are not part of it: the recipe gave only
    ``attention.softmax_layers``; nor is a sparse cache added after training (``attention.sparse_cache_training:
    false``), nor the settings of :data:`HOW_NOT_WHAT`."""
    try:
        c = LolcatsConfig.from_dict(cfg)
        cfg = dataclasses.replace(c, attention=c.attention.recipe()).to_dict()
        # a sparse cache added only after training is not part of what the stages train
        cfg["attention"] |= {"sparse_cache": c.attention.training().sparse_cache, "sparse_cache_training": True}
    except (ValueError, TypeError):
        pass  # compared as written: it differs from any valid config
    out = {k: v for k, v in cfg.items() if k not in ("out_dir", "threads", "report")}
    out["model"] = {k: v for k, v in out.get("model", {}).items() if k != "name_or_path"}
    for section, keys in HOW_NOT_WHAT.items():
        if isinstance(out.get(section), dict):
            out[section] = {k: v for k, v in out[section].items() if k not in keys}
    return out


RESUMABLE = (2, 3, 4, FORMAT_VERSION)  # formats 2-4 lack only options added since, whose defaults keep their behaviour

# what a run writes into its out_dir; a run that never finished a training step may be started again
# with another config, and these are what is removed then
RUN_FILES = ("train_state", "metrics.jsonl", REPORT_FILE, "attention_mse.png", LAYER_CHOICE_FILE, CONFIG_FILE)


def _protected(path: Path) -> str | None:
    """Why ``--overwrite`` must never delete ``path`` (the root, home, the working folder or one above
    it, a git repository, this package's own folder), or None."""
    p = path.resolve()
    home, cwd = Path.home().resolve(), Path.cwd().resolve()
    package_root = Path(__file__).resolve().parents[1]
    if p == Path(p.anchor):
        return "it is the file-system root"
    if p == home or p in home.parents:
        return "it is your home folder or holds it"
    if p == cwd or p in cwd.parents:
        return "it is the current folder or holds it"
    if p == package_root or p in package_root.parents:
        return "it holds the lolcats installation"
    if (p / ".git").exists():
        return "it is a git repository"
    return None


def _trained(out: Path) -> bool:
    """True once any training step of the run in ``out`` has finished (something would be lost)."""
    state = out / "train_state"
    return ((out / ATTENTION_FILE).exists() or (out / ADAPTER_DIR).exists() or (out / "blockwise").exists()
            or any(state.glob("*/LATEST")) or any(state.glob("*/DONE")) or any(state.glob("*/step-*")))


def check_out_dir(out: Path, overwrite: bool) -> None:
    """Checks of ``out_dir`` that need no model: a folder (or nothing) under a writable parent, and
    ``--overwrite`` only where it deletes a lolcats run and nothing else."""
    if str(out).strip() in ("", "."):
        if overwrite:
            raise CheckpointError(f"out_dir={str(out)!r} with --overwrite would delete the current folder; "
                                  "set out_dir to a folder of its own")
    if out.exists() and not out.is_dir():
        raise CheckpointError(f"out_dir {out} is an existing file; choose a folder for out_dir")
    parent = next((p for p in [out, *out.parents] if p.exists()), Path("."))
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise CheckpointError(f"out_dir {out} cannot be written ({parent} is not writable); choose an out_dir "
                              "in a folder you can write to")
    if overwrite and out.exists():
        why = _protected(out)
        if why:
            raise CheckpointError(f"--overwrite refuses to delete out_dir {out}: {why}; set out_dir to a folder "
                                  "of its own")
        if any(out.iterdir()) and not is_run_dir(out):
            raise CheckpointError(f"--overwrite deletes only a folder holding a lolcats run ({CONFIG_FILE}); "
                                  f"{out} holds other files: choose another out_dir or empty it yourself")


def plan_out_dir(out: Path, cfg: LolcatsConfig, config_sha: str, overwrite: bool) -> str:
    """What to do with ``out`` before writing: ``new``, ``resume``, ``restart`` (a run that never
    finished a training step, started again with this config) or ``overwrite``. Raises, writing
    nothing, when ``out`` holds another run that has trained."""
    check_out_dir(out, overwrite)
    if not out.exists() or not any(out.iterdir()):
        return "new"
    if overwrite:
        return "overwrite"
    try:
        record = read_run_config(out)
    except CheckpointError as e:
        raise CheckpointError(f"out_dir {out} holds an unreadable run record: {e}") from None
    if record is None:
        # a block-by-block run in progress (blocks, stitched attention) may go on into stage 2
        if {p.name for p in out.iterdir()} - {"blockwise", ATTENTION_FILE, "train_state"}:
            raise CheckpointError(f"out_dir {out} is not empty and holds no lolcats run; choose another out_dir")
        return "resume"
    base = record["base_model"]
    old, new = _comparable(record["config"]), _comparable(cfg.to_dict())
    same_base = base.get("config_sha256") in (None, config_sha)
    if not _trained(out):
        return "resume" if same_base and old == new and record["format_version"] in RESUMABLE else "restart"
    if record["format_version"] not in RESUMABLE:
        raise CheckpointError(f"out_dir {out} was written by an older lolcats (format {record['format_version']}, "
                              "no checksums): it loads and evaluates as is, but cannot be resumed; choose another "
                              "out_dir or pass --overwrite to run again")
    if not same_base:
        raise CheckpointError(
            f"out_dir {out} holds a run on another base model ({base.get('name_or_path')}) than "
            f"{cfg.model.name_or_path} (their configs differ); choose another out_dir or pass --overwrite")
    if old != new:
        diff = sorted(_diff_keys(old, new))
        raise CheckpointError(f"out_dir {out} holds a run with another config (differs in {', '.join(diff[:3])}); "
                              "choose another out_dir or pass --overwrite")
    # results already written must be as they were written, or the rerun refuses (before writing anything)
    verify_files(out, record.get("files", {}))
    for stage in STAGES:
        if stage_done_path(out, stage).exists():
            finished_stage(out, stage)
    return "resume"


def apply_out_dir_plan(out: Path, action: str, fp: str) -> dict[str, str]:
    """Carry out :func:`plan_out_dir`'s decision once the model is loaded and its fingerprint known;
    returns the checksums of result files already written (a resumed run)."""
    record = read_run_config(out) if action == "resume" else None
    if record is not None and record["base_model"]["fingerprint"] != fp:
        raise CheckpointError(
            f"out_dir {out} holds a run on another base model ({record['base_model']['name_or_path']}, fingerprint "
            f"{record['base_model']['fingerprint'][:16]}…) than this one (fingerprint {fp[:16]}…); choose "
            "another out_dir or pass --overwrite")
    if action == "overwrite":
        shutil.rmtree(out)
    elif action == "restart":
        logger.info("%s held a run that never finished a training step; starting it again with this config", out)
        for name in RUN_FILES:
            target = out / name
            if target.is_dir():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()
    out.mkdir(parents=True, exist_ok=True)
    return dict(record.get("files", {})) if record else {}


def _diff_keys(a: dict, b: dict, prefix: str = "") -> list[str]:
    keys = []
    for k in set(a) | set(b):
        if isinstance(a.get(k), dict) and isinstance(b.get(k), dict):
            keys += _diff_keys(a[k], b[k], f"{prefix}{k}.")
        elif a.get(k) != b.get(k):
            keys.append(f"{prefix}{k}")
    return keys


def stage_done_path(out: Path, stage: str) -> Path:
    return out / "train_state" / stage / "DONE"


def mark_stage_done(out: Path, stage: str, info: dict[str, Any]) -> None:
    """Mark ``stage`` finished: ``train_state/<stage>/DONE`` holds its summary and the sha256 of its result file."""
    done = stage_done_path(out, stage)
    done.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(done, json.dumps(info))


def finished_stage(out: Path, stage: str) -> dict[str, Any] | None:
    """A finished stage's summary (None when it has not finished), after checking its result file still has
    the sha256 recorded then."""
    done, result_file = stage_done_path(out, stage), STAGES[stage]
    if not done.exists():
        return None
    try:
        info = json.loads(done.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{done} is damaged ({e}); delete it to train that stage again") from None
    if not isinstance(info, dict) or "sha256" not in info:
        raise CheckpointError(f"{done} records no sha256 of {result_file} (an older lolcats wrote it); delete it to "
                              "train that stage again, or pass --overwrite")
    verify_files(out, {result_file: info["sha256"]})
    return info
