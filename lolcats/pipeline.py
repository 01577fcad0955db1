"""``lolcats linearize``: load, measure, convert, stage 1, stage 2, report — resumable at every step."""

from __future__ import annotations

import dataclasses
import datetime
import json
import logging
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
    ATTENTION_FILE,
    CheckpointError,
    fingerprint,
    load_attention,
    load_base,
    pick_device,
    read_run_config,
    save_attention,
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
from lolcats.report import plot_mse, write_report
from lolcats.training import atomic_write_text

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
        with open(self.path, "a") as f:
            f.write(json.dumps({"time": round(time.time(), 3), **record}) + "\n")


class _Cached:
    """Results of slow, deterministic measurements, kept in train_state/ so a resumed run skips them."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.data: dict[str, Any] = json.loads(path.read_text()) if path.exists() else {}

    def get(self, key: str, compute: Callable[[], Any]) -> Any:
        if key not in self.data:
            self.data[key] = compute()
            atomic_write_text(self.path, json.dumps(self.data, indent=1))
        return self.data[key]


def _comparable(cfg: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in cfg.items() if k not in ("out_dir", "threads", "report")}


def prepare_out_dir(out: Path, cfg: LolcatsConfig, fp: str, overwrite: bool) -> None:
    """Refuse an out_dir holding another run (other base or config) unless ``overwrite``."""
    if overwrite and out.exists():
        shutil.rmtree(out)
    if out.exists() and any(out.iterdir()):
        try:
            record = read_run_config(out)
        except (CheckpointError, json.JSONDecodeError) as e:
            raise CheckpointError(f"out_dir {out} holds an unreadable checkpoint ({e}); pass --overwrite") from None
        if record is None:
            # a block-by-block run in progress (blocks, stitched attention) may go on into stage 2
            if {p.name for p in out.iterdir()} - {"blockwise", ATTENTION_FILE, "train_state"}:
                raise CheckpointError(f"out_dir {out} is not empty and holds no lolcats run; choose another out_dir "
                                      "or pass --overwrite")
            out.mkdir(parents=True, exist_ok=True)
            return
        if record["base_model"]["fingerprint"] != fp:
            raise CheckpointError(
                f"out_dir {out} holds a run on another base model ({record['base_model']['name_or_path']}, "
                f"fingerprint {record['base_model']['fingerprint'][:16]}…) than {cfg.model.name_or_path} "
                f"(fingerprint {fp[:16]}…); choose another out_dir or pass --overwrite")
        old, new = _comparable(record["config"]), _comparable(cfg.to_dict())
        if old != new:
            diff = sorted(_diff_keys(old, new))
            raise CheckpointError(f"out_dir {out} holds a run with another config (differs in {', '.join(diff[:3])}); "
                                  "choose another out_dir or pass --overwrite")
    out.mkdir(parents=True, exist_ok=True)


def _diff_keys(a: dict, b: dict, prefix: str = "") -> list[str]:
    keys = []
    for k in set(a) | set(b):
        if isinstance(a.get(k), dict) and isinstance(b.get(k), dict):
            keys += _diff_keys(a[k], b[k], f"{prefix}{k}.")
        elif a.get(k) != b.get(k):
            keys.append(f"{prefix}{k}")
    return keys


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
    model, tokenizer, resolved = load_base(cfg.model)
    fp = fingerprint(model)
    if main:
        prepare_out_dir(out, cfg, fp, overwrite)
        state.mkdir(exist_ok=True)
    distributed.barrier()
    source = Path(resolved) / "SOURCE.json"
    source_note = json.loads(source.read_text())["note"] if source.exists() else ""
    record = {
        "status": "running", "config": cfg.to_dict(),
        "base_model": {"name_or_path": cfg.model.name_or_path, "resolved": resolved, "fingerprint": fp,
                       "class": type(model).__name__, "model_type": model.config.model_type, "note": source_note},
        "versions": versions(),
    }
    if main:
        write_run_config(out, record)
    log = _Metrics(out / "metrics.jsonl") if main else (lambda record: None)
    cached = _Cached(state / "evals.json")
    report = cfg.report.enabled and main

    d = cfg.data
    train, heldout = build_train_data(d.train, tokenizer, d.seq_len, d.heldout_chunks, before=d.train_filter,
                                      max_train_chunks=d.max_train_chunks)
    cfg = dataclasses.replace(
        cfg, distill=dataclasses.replace(cfg.distill, max_steps=cfg.steps(cfg.distill, len(train))),
        lora=dataclasses.replace(cfg.lora, max_steps=cfg.steps(cfg.lora, len(train))))
    evals: dict[str, dict[str, float]] = {}
    if report:
        in_dom = (heldout if d.eval_in_domain == "heldout" else
                  build_eval_windows(d.eval_in_domain, tokenizer, d.seq_len, d.eval_windows,
                                     from_=d.eval_in_domain_filter))
        ood = build_eval_windows(d.eval_out_of_domain, tokenizer, d.seq_len, d.eval_windows)

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
        load_attention(model, out / ATTENTION_FILE)
        stages["stage1"] = json.loads(done1.read_text())
    else:
        progress.start("stage1", cfg.distill.max_steps)
        result = run_stage1(model, train, heldout, cfg.distill, state / "stage1", cfg.seed, log, progress.update)
        progress.end()
        stages["stage1"] = {"trainable": trainable1, "steps": result.steps, "tokens": result.tokens,
                            "seconds": result.seconds, "best_step": result.best_step, "best_eval": result.best_eval}
        if main:
            save_attention(model, out / ATTENTION_FILE)
            atomic_write_text(done1, json.dumps(stages["stage1"]))
    if report:
        measure("stage1")
        mse_after = cached.get("mse_after", lambda: heldout_attention_mse(model, heldout))

    # ---------------------------------------------------------------- stage 2
    final = model
    if cfg.lora.max_steps > 0:
        final = add_lora(model, cfg.lora, cfg.seed)
        done2 = state / "stage2" / "DONE"
        adapter = out / ADAPTER_DIR
        if done2.exists():
            from peft import set_peft_model_state_dict
            from safetensors.torch import load_file

            set_peft_model_state_dict(final, load_file(str(adapter / "adapter_model.safetensors")))
            stages["stage2"] = json.loads(done2.read_text())
        else:
            trainable2 = sum(p.numel() for p in lora_parameters(final).values())
            progress.start("stage2", cfg.lora.max_steps)
            result = run_stage2(final, train, heldout, cfg.lora, state / "stage2", cfg.seed, log, progress.update)
            progress.end()
            stages["stage2"] = {"trainable": trainable2, "steps": result.steps, "tokens": result.tokens,
                                "seconds": result.seconds, "best_step": result.best_step,
                                "best_eval": result.best_eval}
            if main:
                tmp = out / f".{ADAPTER_DIR}.tmp"
                shutil.rmtree(tmp, ignore_errors=True)
                final.save_pretrained(str(tmp))
                shutil.rmtree(adapter, ignore_errors=True)
                tmp.rename(adapter)
                atomic_write_text(done2, json.dumps(stages["stage2"]))
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
