"""``lolcats linearize``: load, measure, convert, stage 1, stage 2, report — resumable at every step."""

from __future__ import annotations

import dataclasses
import datetime
import json
import logging
import os
import platform
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import torch

from lolcats import distributed
from lolcats.checkpoint import (
    ADAPTER_DIR,
    ADAPTER_WEIGHTS,
    ATTENTION_FILE,
    CONFIG_FILE,
    FORMAT_VERSION,
    CheckpointError,
    base_config,
    config_sha256,
    fingerprint,
    is_run_dir,
    load_adapter_weights,
    load_attention,
    load_base,
    load_tokenizer,
    pick_device,
    read_run_config,
    save_adapter,
    save_attention,
    verify_files,
    versions,
    write_run_config,
)
from lolcats.config import LolcatsConfig
from lolcats.convert import convert_model, trainable_attention_parameters
from lolcats.data import build_eval_windows, build_train_data
from lolcats.distill import heldout_attention_mse, run_stage1
from lolcats.eval.perplexity import perplexity
from lolcats.finetune import add_lora, lora_parameters, run_stage2
from lolcats.generate import generate_text
from lolcats.io import append_jsonl, atomic_write_text, sha256_file
from lolcats.report import plot_mse, write_report

logger = logging.getLogger(__name__)
REPORT_FILE = "report.md"


class Progress(Protocol):
    """What the pipeline tells a front end (the CLI draws progress bars from it)."""

    def start(self, stage: str, total_steps: int) -> None: ...
    def update(self, step: int, tokens: int, record: dict) -> None: ...
    def end(self) -> None: ...


class _NoProgress:
    def start(self, stage: str, total_steps: int) -> None:
        logger.info("%s: %d optimizer steps", stage, total_steps)

    def update(self, step: int, tokens: int, record: dict) -> None:
        pass

    def end(self) -> None:
        pass


@dataclasses.dataclass
class RunResult:
    out_dir: Path
    table: str
    report: Path
    model: torch.nn.Module


class _Metrics:
    def __init__(self, path: Path) -> None:
        self.path = path

    def __call__(self, record: dict) -> None:
        append_jsonl(self.path, {"time": round(time.time(), 3), **record})


class _Cached:
    """Results of slow, deterministic measurements, kept in train_state/ so a resumed run skips them."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            self.data: dict[str, Any] = json.loads(path.read_text()) if path.exists() else {}
        except (UnicodeDecodeError, json.JSONDecodeError):
            logger.warning("%s is damaged; measuring again", path)
            self.data = {}

    def get(self, key: str, compute: Callable[[], Any]) -> Any:
        if key not in self.data:
            self.data[key] = compute()
            atomic_write_text(self.path, json.dumps(self.data, indent=1))
        return self.data[key]


def _comparable(cfg: dict[str, Any]) -> dict[str, Any]:
    """The config a resumed run must share; the base itself is compared by fingerprint, not by name."""
    out = {k: v for k, v in cfg.items() if k not in ("out_dir", "threads", "report")}
    out["model"] = {k: v for k, v in out.get("model", {}).items() if k != "name_or_path"}
    return out


# what a run writes into its out_dir; a run that never finished a training step may be started again
# with another config, and these are what is removed then
RUN_FILES = ("train_state", "metrics.jsonl", REPORT_FILE, "attention_mse.png", CONFIG_FILE)


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
        return "resume" if same_base and old == new and record["format_version"] == FORMAT_VERSION else "restart"
    if record["format_version"] != FORMAT_VERSION:
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
    for stage, result_file in (("stage1", ATTENTION_FILE), ("stage2", ADAPTER_WEIGHTS)):
        if (out / "train_state" / stage / "DONE").exists():
            finished_stage(out / "train_state" / stage / "DONE", out, result_file)
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


def mark_stage_done(done: Path, info: dict[str, Any]) -> None:
    """Mark a stage finished: ``train_state/<stage>/DONE`` holds its summary and the sha256 of what it wrote."""
    done.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(done, json.dumps(info))


def finished_stage(done: Path, out: Path, result_file: str) -> dict[str, Any]:
    """A finished stage's summary, after checking its result file still has the sha256 recorded then."""
    try:
        info = json.loads(done.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{done} is damaged ({e}); delete it to train that stage again") from None
    if not isinstance(info, dict) or "sha256" not in info:
        raise CheckpointError(f"{done} records no sha256 of {result_file} (an older lolcats wrote it); delete it to "
                              "train that stage again, or pass --overwrite")
    verify_files(out, {result_file: info["sha256"]})
    return info


def linearize(cfg: LolcatsConfig, overwrite: bool = False, progress: Progress | None = None) -> RunResult:
    """Run the whole LoLCATs recipe into ``cfg.out_dir``; rerunning resumes where it stopped."""
    # under torchrun / `accelerate launch` every rank runs this function: the stages train data-parallel,
    # rank 0 alone measures, reports and writes files
    rank, _ = distributed.init_from_env(pick_device(cfg.model.device).type)
    main = rank == 0
    progress = (progress if main else None) or _NoProgress()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    out = Path(cfg.out_dir).expanduser()
    state = out / "train_state"
    # everything that can be checked without the model is checked before it loads and before anything is
    # written: the base's config, the tokenizer, every data source, and what out_dir holds
    resolved, hf_config = base_config(cfg.model)
    tokenizer = load_tokenizer(resolved, cfg.model.trust_remote_code)
    d = cfg.data
    train, heldout = build_train_data(d.train, tokenizer, d.seq_len, d.heldout_chunks, before=d.train_filter,
                                      max_train_chunks=d.max_train_chunks)
    report = cfg.report.enabled and main
    if report:
        in_dom = (heldout if d.eval_in_domain == "heldout" else
                  build_eval_windows(d.eval_in_domain, tokenizer, d.seq_len, d.eval_windows,
                                     from_=d.eval_in_domain_filter))
        ood = build_eval_windows(d.eval_out_of_domain, tokenizer, d.seq_len, d.eval_windows)
    config_sha = config_sha256(hf_config)
    action = plan_out_dir(out, cfg, config_sha, overwrite)
    model, _, _ = load_base(cfg.model)
    fp = fingerprint(model)
    files: dict[str, str] = {}
    if main:
        files = apply_out_dir_plan(out, action, fp)
        state.mkdir(exist_ok=True)
    distributed.barrier()
    source = Path(resolved) / "SOURCE.json"
    source_note = json.loads(source.read_text())["note"] if source.exists() else ""
    record = {
        "status": "running", "config": cfg.to_dict(),
        "base_model": {"name_or_path": cfg.model.name_or_path, "resolved": resolved, "fingerprint": fp,
                       "config_sha256": config_sha, "class": type(model).__name__,
                       "model_type": model.config.model_type, "note": source_note},
        "versions": versions(), "files": files,
    }
    if main:
        write_run_config(out, record)
    log = _Metrics(out / "metrics.jsonl") if main else (lambda record: None)
    cached = _Cached(state / "evals.json")

    cfg = dataclasses.replace(
        cfg, distill=dataclasses.replace(cfg.distill, max_steps=cfg.steps(cfg.distill, len(train))),
        lora=dataclasses.replace(cfg.lora, max_steps=cfg.steps(cfg.lora, len(train))))
    evals: dict[str, dict[str, float]] = {}
    if report:
        def measure(key: str, window: int | None = None) -> None:
            evals[key] = cached.get(key, lambda: {"in_domain": perplexity(model, in_dom, window),
                                                  "out_of_domain": perplexity(model, ood, window)})
            log({"eval": key, **evals[key]})

        measure("original")
        measure("window_only", cfg.attention.window_size)

    convert_model(model, cfg.attention, seed=cfg.seed)  # per-layer seeded feature-map initialisation
    stages: dict[str, dict[str, Any]] = {}
    mse_before = mse_after = None
    if report:
        measure("converted")
        mse_before = cached.get("mse_before", lambda: heldout_attention_mse(model, heldout))

    # ---------------------------------------------------------------- stage 1
    trainable1 = sum(p.numel() for p in trainable_attention_parameters(model).values())
    done1 = state / "stage1" / "DONE"
    if done1.exists():
        stages["stage1"] = finished_stage(done1, out, ATTENTION_FILE)
        load_attention(model, out / ATTENTION_FILE)
    else:
        progress.start("stage1", cfg.distill.max_steps)
        result = run_stage1(model, train, heldout, cfg.distill, state / "stage1", cfg.seed, log, progress.update)
        progress.end()
        stages["stage1"] = {"trainable": trainable1, "steps": result.steps, "tokens": result.tokens,
                            "seconds": result.seconds, "best_step": result.best_step, "best_eval": result.best_eval}
        if main:
            save_attention(model, out / ATTENTION_FILE)
            stages["stage1"]["sha256"] = sha256_file(out / ATTENTION_FILE)
            mark_stage_done(done1, stages["stage1"])
    if main:
        record["files"][ATTENTION_FILE] = stages["stage1"]["sha256"]
        write_run_config(out, record)
    if report:
        measure("stage1")
        mse_after = cached.get("mse_after", lambda: heldout_attention_mse(model, heldout))

    # ---------------------------------------------------------------- stage 2
    final = model
    if cfg.lora.max_steps > 0:
        final = add_lora(model, cfg.lora, cfg.seed)
        done2 = state / "stage2" / "DONE"
        if done2.exists():
            stages["stage2"] = finished_stage(done2, out, ADAPTER_WEIGHTS)
            load_adapter_weights(final, out)
        else:
            trainable2 = sum(p.numel() for p in lora_parameters(final).values())
            progress.start("stage2", cfg.lora.max_steps)
            result = run_stage2(final, train, heldout, cfg.lora, state / "stage2", cfg.seed, log, progress.update)
            progress.end()
            stages["stage2"] = {"trainable": trainable2, "steps": result.steps, "tokens": result.tokens,
                                "seconds": result.seconds, "best_step": result.best_step,
                                "best_eval": result.best_eval}
            if main:
                stages["stage2"]["sha256"] = save_adapter(final, out)
                mark_stage_done(done2, stages["stage2"])
        if main:
            record["files"][ADAPTER_WEIGHTS] = stages["stage2"]["sha256"]
            write_run_config(out, record)
        final.eval()
        if report:
            model = final
            measure("stage2")

    table = ""
    report_path = out / REPORT_FILE
    if report:
        samples = [(p, generate_text(final, tokenizer, p, cfg.report.sample_tokens)) for p in cfg.report.samples]
        if mse_before:
            plot_mse(mse_before, mse_after, out / "attention_mse.png")
        table = write_report(report_path, {
            "model": cfg.model.name_or_path, "source_note": source_note, "attention": dataclasses.asdict(cfg.attention),
            "date": datetime.date.today().isoformat(),
            "machine": f"{platform.machine()}, {torch.get_num_threads()} threads, {cfg.model.device}",
            "in_domain_desc": (f"the {len(heldout)} held-out chunks of {d.train} ({d.seq_len} tokens each)"
                               if d.eval_in_domain == "heldout" else
                               f"{d.eval_in_domain} (files from {d.eval_in_domain_filter!r} on), first "
                               f"{d.eval_windows} windows of {d.seq_len} tokens"),
            "out_of_domain_desc": f"{d.eval_out_of_domain}, first {d.eval_windows} windows of {d.seq_len} tokens",
            "evals": evals, "mse_before": mse_before, "mse_after": mse_after, "stages": stages, "samples": samples,
        })
    record.update(status="complete", stages=stages, evals=evals)
    if main:
        write_run_config(out, record)
    distributed.barrier()
    return RunResult(out, table, report_path, final)
