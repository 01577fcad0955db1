"""``lolcats linearize``: load, measure, convert, stage 1, stage 2, report — resumable at every step."""

from __future__ import annotations

import dataclasses
import datetime
import functools
import json
import logging
import os
import platform
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from lolcats import distributed, sharding
from lolcats.attention import set_sparse_cache
from lolcats.base_model import base_config, config_sha256, fingerprint, load_base, load_tokenizer, pick_device
from lolcats.checkpoint import (
    ATTENTION_FILE,
    load_adapter_weights,
    load_attention,
    save_adapter,
    save_attention,
    versions,
    write_run_config,
)
from lolcats.config import DataConfig, LolcatsConfig
from lolcats.convert import convert_model, trainable_attention_parameters
from lolcats.data import Chunks, build_eval_windows, build_train_data
from lolcats.distill import heldout_attention_mse, run_stage1
from lolcats.eval.long_context import LongContext
from lolcats.eval.perplexity import perplexity
from lolcats.finetune import add_lora, lora_parameters, run_stage2
from lolcats.generate import generate_text
from lolcats.io import append_jsonl, atomic_write_text, sha256_file
from lolcats.layer_choice import check_softmax_layers, linearized_ids, rank_layers, read_choice, restore_softmax, write_choice
from lolcats.positions import check_position_offset, shifted_positions
from lolcats.progress import LogProgress, Progress
from lolcats.report import plot_mse, write_report
from lolcats.run_dir import (
    LAYER_CHOICE_FILE,
    REPORT_FILE,
    STAGES,
    apply_out_dir_plan,
    finished_stage,
    mark_stage_done,
    plan_out_dir,
)

logger = logging.getLogger(__name__)


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
    """Results of slow, deterministic measurements, kept in train_state/ so a resumed run skips them (``write``:
    this process is the one that writes them; the others of a sharded run measure alike and keep them in memory)."""

    def __init__(self, path: Path, write: bool = True) -> None:
        self.path, self.write = path, write
        try:
            self.data: dict[str, Any] = json.loads(path.read_text()) if path.exists() else {}
        except (UnicodeDecodeError, json.JSONDecodeError):
            logger.warning("%s is damaged; measuring again", path)
            self.data = {}

    def get(self, key: str, compute: Callable[[], Any]) -> Any:
        if key not in self.data:
            self.data[key] = compute()
            if self.write:
                atomic_write_text(self.path, json.dumps(self.data, indent=1))
        return self.data[key]


def eval_windows(spec: str, tokenizer: Any, d: DataConfig, from_: str = "") -> Chunks:
    """The report's perplexity windows of a corpus: the first ``data.eval_windows`` of ``data.eval_seq_len``
    tokens (whatever the training length ``data.seq_len`` is)."""
    try:
        return build_eval_windows(spec, tokenizer, d.eval_seq_len, d.eval_windows, from_=from_)
    except ValueError as e:
        if "fewer than one chunk" not in str(e):
            raise
        raise ValueError(f"evaluation data {spec} is shorter than one window of data.eval_seq_len={d.eval_seq_len} "
                         "tokens; lower data.eval_seq_len or give a longer corpus") from None


def linearize(cfg: LolcatsConfig, overwrite: bool = False, progress: Progress | None = None) -> RunResult:
    """Run the whole LoLCATs recipe into ``cfg.out_dir``; rerunning resumes where it stopped.

    Under torchrun / ``accelerate launch`` every rank runs this: the stages train data-parallel, rank 0
    alone measures, reports and writes files; with ``model.sharding: fsdp`` every rank holds a shard of the base
    (:mod:`lolcats.sharding`), so every rank measures too (a forward pass is a collective) and rank 0 writes.
    """
    run = Run(cfg, overwrite, progress)
    run.baselines()
    run.convert()
    run.stage1()
    run.choose_softmax_layers()
    run.stage2()
    run.long_context()
    return run.finish()


class Run:
    """One ``linearize`` run, as named steps. Construction checks everything that can be checked without
    the model (base config, tokenizer, every data source, what out_dir holds) before the model loads and
    before anything is written, then loads the base and prepares out_dir."""

    def __init__(self, cfg: LolcatsConfig, overwrite: bool, progress: Progress | None) -> None:
        cfg = dataclasses.replace(cfg, attention=cfg.attention.recipe())  # a recorded layer choice is made again
        rank, _ = distributed.init_from_env(pick_device(cfg.model.device).type)
        self.main = rank == 0
        self.progress = (progress if self.main else None) or LogProgress()
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        self.out = out = Path(cfg.out_dir).expanduser()
        self.state = out / "train_state"
        resolved, hf_config = base_config(cfg.model)
        if cfg.attention.softmax_layers and getattr(hf_config, "num_hidden_layers", None):
            check_softmax_layers(cfg.attention.softmax_layers, hf_config.num_hidden_layers)
        self.tokenizer = load_tokenizer(resolved, cfg.model.trust_remote_code)
        d = cfg.data
        check_position_offset(d, getattr(hf_config, "max_position_embeddings", None))
        self.train, self.heldout = build_train_data(d.train, self.tokenizer, d.seq_len, d.heldout_chunks,
                                                    before=d.train_filter, max_train_chunks=d.max_train_chunks)
        self.sharded = sharding.requested(cfg.model)
        self.reporting = cfg.report.enabled and (self.main or self.sharded)  # the ranks that measure; rank 0 writes
        if self.reporting:
            self.eval_sets = {
                "in_domain": (self.heldout if d.eval_in_domain == "heldout" else
                              eval_windows(d.eval_in_domain, self.tokenizer, d, from_=d.eval_in_domain_filter)),
                "out_of_domain": eval_windows(d.eval_out_of_domain, self.tokenizer, d)}
        config_sha = config_sha256(hf_config)
        action = plan_out_dir(out, cfg, config_sha, overwrite)
        if self.sharded:
            self.shards: sharding.ShardedBase | None = sharding.load_sharded(cfg.model)
            self.model, model_class = self.shards.model, self.shards.class_name
            fp = fingerprint(self.model, self.shards.head)
        else:
            self.shards = None
            self.model, _, _ = load_base(cfg.model)
            model_class = type(self.model).__name__
            fp = fingerprint(self.model)
        files: dict[str, str] = {}
        if self.main:
            files = apply_out_dir_plan(out, action, fp)
            self.state.mkdir(exist_ok=True)
        distributed.barrier()
        source = Path(resolved) / "SOURCE.json"
        self.source_note = json.loads(source.read_text())["note"] if source.exists() else ""
        self.record: dict[str, Any] = {
            "status": "running", "config": cfg.to_dict(),
            "base_model": {"name_or_path": cfg.model.name_or_path, "resolved": resolved, "fingerprint": fp,
                           "config_sha256": config_sha, "class": model_class,
                           "model_type": self.model.config.model_type, "note": self.source_note},
            "versions": versions(), "files": files,
        }
        self.choice: dict[str, Any] | None = None  # the layer choice (attention.softmax_layers), once made
        if cfg.attention.softmax_layers and not cfg.attention.skip_layers:
            self.choice = self._read_choice(cfg)  # a resumed run's choice stays in its record
            if self.choice is not None:
                self.record["config"]["attention"] = dataclasses.asdict(cfg.attention.with_chosen(self.choice["chosen"]))
        self._write_record()
        self.log = _Metrics(out / "metrics.jsonl") if self.main else (lambda record: None)
        self.cached = _Cached(self.state / "evals.json", write=self.main)
        self.cfg = dataclasses.replace(
            cfg, distill=dataclasses.replace(cfg.distill, max_steps=cfg.steps(cfg.distill, len(self.train))),
            lora=dataclasses.replace(cfg.lora, max_steps=cfg.steps(cfg.lora, len(self.train))))
        self.evals: dict[str, dict[str, float]] = {}
        self.stages: dict[str, dict[str, Any]] = {}
        self.mse_before: list[float] | None = None
        self.mse_after: list[float] | None = None
        self.final: torch.nn.Module = self.model

    def _write_record(self) -> None:
        if self.main:
            write_run_config(self.out, self.record)

    def measure(self, key: str, window: int | None = None, sinks: int = 0, tag: str = "") -> None:
        """Held-out perplexities of the model as it is now (cached in train_state/ under ``key`` + ``tag``); with
        ``window`` (and ``sinks``) a softmax model sees only that many recent keys (and the first tokens)."""
        if not self.reporting:
            return

        def compute() -> dict[str, float]:
            sets = self.eval_sets
            self.progress.start(f"eval {key}", sum(len(c) for c in sets.values()), unit="window")
            done, result = 0, {}
            for name, chunks in sets.items():
                result[name] = perplexity(self.final, chunks, window,
                                          progress=lambda i, base=done: self.progress.update(base + i), sinks=sinks)
                done += len(chunks)
            self.progress.end()
            return {**result, "sinks": sinks} if sinks else result

        self.evals[key] = self.cached.get((key if not sinks else f"{key} {sinks}") + tag, compute)
        self.log({"eval": key, **self.evals[key]})

    @functools.cached_property
    def _long(self) -> LongContext | None:
        """The long-context measurements (``report.long_context``), or None when off or not reporting."""
        if not (self.reporting and self.cfg.report.long_context):
            return None
        return LongContext(self.cfg.report, self.tokenizer, self.cached.get, self.progress)

    def baselines(self) -> None:
        """The original model, a sliding-window-only baseline (no linear term) and a window + attention-sinks
        baseline (``report.baseline_sinks``; 0 leaves it out). With ``report.long_context`` the same softmax
        baselines are measured on long windows (and the original on passkey) now, before conversion."""
        w, s = self.cfg.attention.window_size, self.cfg.report.baseline_sinks
        if self._long is not None:
            self._long.check(self.model)
        self.measure("original")
        self.measure("window_only", w)
        if s:
            self.measure("window_sinks", w, s)
        if self._long is not None:
            self._long.perplexity("original", self.model)
            self._long.perplexity("window_only", self.model, w)
            if s:
                self._long.perplexity("window_sinks", self.model, w, s)
            self._long.passkey("original", self.model)
            self.evals["long_context"] = self._long.results

    def long_context(self) -> None:
        """The final model's perplexity by position on long windows and passkey accuracy (``report.long_context``)."""
        tag = self.add_inference_cache()  # the final model from here on (finish samples it), stage 2 run or not
        if self._long is not None:
            self._long.perplexity("final", self.final, tag=tag)
            self._long.passkey("final", self.final, tag=tag)
            self.evals["long_context"] = self._long.results

    def convert(self) -> None:
        """Swap every attention layer (per-layer seeded feature maps) and measure the untrained conversion."""
        a = self.cfg.attention
        convert_model(self.model, a.training(), seed=self.cfg.seed)  # a sparse cache added after training waits
        if a.softmax_layers and not a.skip_layers:  # native-window layers kept as they are do not count
            check_softmax_layers(a.softmax_layers, len(linearized_ids(self.model)), "linearized layers")
        self.measure("converted")
        if self.reporting:
            self.mse_before = self.cached.get("mse_before", lambda: heldout_attention_mse(self.model, self.heldout))

    def _stage(self, name: str, trainable: int, total_steps: int, train: Callable[[], Any],
               save: Callable[[], str], restore: Callable[[], None]) -> None:
        """Train stage ``name`` (or restore it when a finished one is on disk, its checksum verified)."""
        done = finished_stage(self.out, name)
        if done is not None:
            self.stages[name] = done
            restore()
        else:
            self.progress.start(name, total_steps)
            result = train()
            self.progress.end()
            self.stages[name] = {"trainable": trainable, "steps": result.steps, "tokens": result.tokens,
                                 "seconds": result.seconds, "best_step": result.best_step,
                                 "best_eval": result.best_eval}
            if self.main:
                self.stages[name]["sha256"] = save()
                mark_stage_done(self.out, name, self.stages[name])
        if self.main:
            self.record["files"][STAGES[name]] = self.stages[name]["sha256"]
            self._write_record()

    def _shifted(self, train: Callable[[], Any]) -> Any:
        """Run a stage with its chunks at shifted positions (``data.max_position_offset``)."""
        with shifted_positions(self.model, self.cfg.data.max_position_offset, self.cfg.seed):
            return train()

    def stage1(self) -> None:
        """Attention transfer: feature maps and window factors learn each layer's softmax output."""
        c = self.cfg

        def save() -> str:
            save_attention(self.model, self.out / ATTENTION_FILE)
            return sha256_file(self.out / ATTENTION_FILE)

        self._stage("stage1", sum(p.numel() for p in trainable_attention_parameters(self.model).values()),
                    c.distill.max_steps,
                    lambda: self._shifted(lambda: run_stage1(self.model, self.train, self.heldout, c.distill,
                                                             self.state / "stage1", c.seed, self.log,
                                                             self.progress.update)),
                    save, lambda: load_attention(self.model, self.out / ATTENTION_FILE))
        self.measure("stage1")
        if self.reporting:
            self.mse_after = self.cached.get("mse_after", lambda: heldout_attention_mse(self.model, self.heldout))

    def _read_choice(self, cfg: LolcatsConfig) -> dict[str, Any] | None:
        """``layer_choice.json`` (None when there is none), made for this run's ``softmax_layers`` and criterion."""
        path, a = self.out / LAYER_CHOICE_FILE, cfg.attention
        choice = read_choice(path)
        if choice is not None and (choice.get("softmax_layers"), choice.get("criterion"), len(set(choice["chosen"]))) \
                != (a.softmax_layers, a.softmax_criterion, a.softmax_layers):
            raise ValueError(f"{path} chose layers {choice['chosen']} by {choice.get('criterion')!r} for softmax_layers="
                             f"{choice.get('softmax_layers')}, not for this run's; delete it to choose again")
        return choice

    def choose_softmax_layers(self) -> None:
        """With ``attention.softmax_layers: N``, rank the linearized layers by both criteria of
        :mod:`lolcats.layer_choice` on the held-out chunks (once: ``layer_choice.json``; a resumed run reads it),
        restore the N that ``attention.softmax_criterion`` ranks first to softmax for stage 2 and everything
        after, and record them in the run's config as a derived ``skip_layers`` (``skip_layers_chosen``), so
        ``load`` rebuilds the same model. ``skip_layers`` given by hand wins: nothing is measured."""
        a = self.cfg.attention
        if not a.softmax_layers:
            return
        if a.skip_layers:
            logger.warning("attention.skip_layers=%s given by hand wins over attention.softmax_layers=%d; no layer "
                           "choice is measured", a.skip_layers, a.softmax_layers)
            self.choice = {"by_hand": list(a.skip_layers), "softmax_layers": a.softmax_layers}
            return
        path = self.out / LAYER_CHOICE_FILE
        if self.choice is None:
            if self.main or self.sharded:  # forward passes: every rank of a sharded model runs them
                ranking = rank_layers(self.model, self.heldout, a.softmax_layers, a.softmax_criterion, self.progress)
                if self.main:
                    write_choice(path, ranking)
            distributed.barrier()
            self.choice = self._read_choice(self.cfg)
        chosen = self.choice["chosen"]
        if not set(chosen) <= set(linearized_ids(self.model)):
            raise ValueError(f"{path} chose layers {chosen}, not all of them linearized in this run; delete it to "
                             "choose again")
        restore_softmax(self.model, chosen)
        self.cfg = dataclasses.replace(self.cfg, attention=a.with_chosen(chosen))
        self.record["config"]["attention"] = dataclasses.asdict(self.cfg.attention)
        if self.main:
            self.record["files"][LAYER_CHOICE_FILE] = sha256_file(path)
        self._write_record()
        self.measure("softmax_layers")

    def stage2(self) -> None:
        """LoRA repair with ``lora.loss`` (next-token or KL from the original; skipped when ``lora.max_steps`` is 0)."""
        c = self.cfg
        if c.lora.max_steps <= 0:
            return
        self.final = peft_model = add_lora(self.model, c.lora, c.seed)
        self._stage("stage2", sum(p.numel() for p in lora_parameters(peft_model).values()), c.lora.max_steps,
                    lambda: self._shifted(lambda: run_stage2(peft_model, self.train, self.heldout, c.lora,
                                                             self.state / "stage2", c.seed, self.log,
                                                             self.progress.update)),
                    lambda: save_adapter(peft_model, self.out), lambda: load_adapter_weights(peft_model, self.out))
        peft_model.eval()
        self.measure("stage2", tag=self.add_inference_cache())

    def add_inference_cache(self) -> str:
        """Give the trained model a sparse cache kept out of training; returns the tag its measurements are cached under."""
        a = self.cfg.attention
        if a.training() is a:
            return ""
        set_sparse_cache(self.final, a.sparse_cache)
        return f" sparse_cache {a.sparse_cache}"

    def finish(self) -> RunResult:
        """Write report.md (when enabled) and mark the run complete."""
        c, d = self.cfg, self.cfg.data
        table = ""
        report_path = self.out / REPORT_FILE
        if self.reporting:  # under sharding every rank generates the samples (the same text)
            samples = [(p, generate_text(self.final, self.tokenizer, p, c.report.sample_tokens))
                       for p in c.report.samples]
        if self.reporting and self.main:
            if self.mse_before:
                plot_mse(self.mse_before, self.mse_after, self.out / "attention_mse.png")
            table = write_report(report_path, {
                "model": c.model.name_or_path, "source_note": self.source_note,
                "attention": dataclasses.asdict(c.attention), "date": datetime.date.today().isoformat(),
                "machine": f"{platform.machine()}, {torch.get_num_threads()} threads, {c.model.device}",
                "in_domain_desc": (f"the {len(self.heldout)} held-out chunks of {d.train} (training chunks of "
                                   f"{d.seq_len} tokens)" if d.eval_in_domain == "heldout" else
                                   f"{d.eval_in_domain} (files from {d.eval_in_domain_filter!r} on), first "
                                   f"{d.eval_windows} windows of {d.eval_seq_len} tokens"),
                "out_of_domain_desc": (f"{d.eval_out_of_domain}, first {d.eval_windows} windows of {d.eval_seq_len} "
                                       "tokens"),
                "evals": self.evals, "mse_before": self.mse_before, "mse_after": self.mse_after,
                "stages": self.stages, "samples": samples, "layer_choice": self.choice,
            })
        self.record.update(status="complete", stages=self.stages, evals=self.evals)
        self._write_record()
        if self.shards is not None and os.environ.get(sharding.STATS_ENV):
            self.shards.write_stats(os.environ[sharding.STATS_ENV])
        distributed.barrier()
        return RunResult(self.out, table, report_path, self.final)
