"""The training loop every stage shares (stage 1, stage 2, each block of block-by-block stage 1): gradient
accumulation, held-out evaluation, best-checkpoint keeping, NaN stops, and exact resume from ``train_state/<stage>/``.

Resume is exact: optimizer, scheduler, RNG and the data cursor are restored at an optimizer-step
boundary and the data order is a pure function of (seed, epoch), so a killed and resumed run gives
bit-identical weights to an uninterrupted one (same thread count).
"""

from __future__ import annotations

import ctypes
import functools
import json
import logging
import math
import os
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import Tensor, nn

from lolcats import distributed
from lolcats.config import LoopConfig
from lolcats.data import Chunks, epoch_order
from lolcats.io import atomic_save_safetensors, atomic_write_text, fault_point, fault_scope, sha256_file

logger = logging.getLogger(__name__)


CHECKSUMS = "checksums.json"
CHECKPOINT_FILES = ("weights.safetensors", "trainer.pt")


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        trim = ctypes.CDLL(None).malloc_trim  # glibc; musl has none
    except (OSError, AttributeError):
        return None
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return trim


def release_heap() -> bool:
    """Give the C heap's free pages back to the operating system (glibc ``malloc_trim``; elsewhere nothing);
    True when some were. CPU tensors of a few MB live on that heap, which keeps the pages of freed ones resident:
    a pass's freed intermediates would otherwise still count in the process's memory while the next pass (the
    loss over the vocabulary, the backward pass) allocates its own, adding about one pass of slack to the peak
    (docs/memory.md). Called between a step's passes; the cost is refaulting the pages the next pass reuses."""
    trim = _malloc_trim()
    return bool(trim(0)) if trim is not None else False


_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
_resident_after_release = 0


def _resident() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * _PAGE


def release_heap_if_grown(growth: int) -> bool:
    """:func:`release_heap` once the process's resident memory has grown by ``growth`` bytes since the last
    release made here: for hooks that run often (after each decoder layer), where releasing every time would
    refault the same pages again and again. False where there is nothing to release or no /proc."""
    global _resident_after_release
    if _malloc_trim() is None:
        return False
    now = _resident()
    if now - _resident_after_release < growth:
        return False
    released = release_heap()
    _resident_after_release = _resident()
    return released


class TrainingError(RuntimeError):
    """A stage stopped (e.g. a non-finite loss); the message says where the last good checkpoint is."""


@dataclass
class StageSpec:
    """What a stage trains; how is its recipe section's :class:`~lolcats.config.LoopConfig`.

    Attributes:
        name: ``stage1`` / ``stage2`` / ``block<N>`` (folder under train_state/, prefix of fault-point keys).
        params: trainable parameters by name (saved and restored by name).
        loss_fn: (inputs, labels) -> (scalar loss to minimise with its graph attached, extra floats to log);
            inputs are token ids (B, T) or stored hidden states (B, T, D).
        eval_fn: () -> held-out loss (float), run without gradients.
        loop: optimizer steps (``max_steps``, or ``epochs`` over the training data), grad_accum, AdamW,
            evaluation and checkpoint cadence, clipping and the learning-rate schedule (``loop.plateau()``).
        data_parallel: under torchrun / ``accelerate launch``, split each optimizer step's micro-batches
            over the ranks and sum their gradients (the same global batch as one process); rank 0 writes.
    """

    name: str
    params: dict[str, nn.Parameter]
    loss_fn: Callable[[Tensor, Tensor], tuple[Tensor, dict[str, float]]]
    eval_fn: Callable[[], float]
    loop: LoopConfig
    data_parallel: bool = False


@dataclass
class StageResult:
    steps: int
    tokens: int
    seconds: float
    best_step: int
    best_eval: float
    history: list[dict]


class Trainer:
    """Runs one stage; ``state_dir`` holds its resume checkpoints."""

    def __init__(self, spec: StageSpec, data: Chunks, state_dir: Path, seed: int,
                 log: Callable[[dict], None], progress: Callable[[int, int, dict], None] | None = None) -> None:
        self.spec, self.loop, self.data, self.seed, self.log = spec, spec.loop, data, seed, log
        self.progress = progress
        self.max_steps = spec.loop.steps(len(data))
        self.dir = state_dir
        self.dir.mkdir(parents=True, exist_ok=True)
        self.optimizer = torch.optim.AdamW(list(spec.params.values()), lr=spec.loop.lr,
                                           weight_decay=spec.loop.weight_decay)
        plateau = spec.loop.plateau()
        self.scheduler = (torch.optim.lr_scheduler.ReduceLROnPlateau(self.optimizer, mode="min", **plateau)
                          if plateau is not None else None)
        self.dp = spec.data_parallel and distributed.active()
        self.main = not self.dp or distributed.is_main()
        grad_accum, world = spec.loop.grad_accum, distributed.world()[1]
        if self.dp and grad_accum % world:
            raise ValueError(f"{spec.name}: grad_accum={grad_accum} must be a multiple of the {world} "
                             "data-parallel processes (each takes an equal share of every optimizer step)")
        self.step = 0
        self.best_eval = math.inf
        self.best_step = -1
        self.tokens = 0
        self.seconds = 0.0
        self.history: list[dict] = []

    # -------------------------------------------------------------------------------- checkpoints
    def _weights(self) -> dict[str, Tensor]:
        return {name: p.detach() for name, p in self.spec.params.items()}

    def _load_weights(self, path: Path) -> None:
        tensors = load_file(str(path))
        missing = set(self.spec.params) - set(tensors)
        if missing:
            raise TrainingError(f"checkpoint {path} lacks {sorted(missing)[0]}; it belongs to another run")
        with torch.no_grad():
            for name, p in self.spec.params.items():
                p.copy_(tensors[name])

    def save(self) -> None:
        """Write a checkpoint at the current optimizer-step boundary (temp folder + rename); rank 0 only."""
        if self.main:
            self._save()
        if self.dp:
            distributed.barrier()

    def _save(self) -> None:
        """``step-N/`` holds weights, trainer state and their sha256 (``checksums.json``, written last);
        ``LATEST`` names it. The previous checkpoint stays until this one is complete, so a checkpoint
        damaged on disk falls back to the one before it."""
        with fault_scope(f"{self.spec.name}:save{self.step}"):
            final = self.dir / f"step-{self.step:08d}"
            tmp = self.dir / f".step-{self.step:08d}.tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
            atomic_save_safetensors(self._weights(), tmp / "weights.safetensors")
            fault_point("trainer.pt:begin")
            torch.save({
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict() if self.scheduler else None,
                "rng": torch.get_rng_state(),
                "step": self.step, "tokens": self.tokens, "seconds": self.seconds,
                "best_eval": self.best_eval, "best_step": self.best_step,
                "history": json.dumps(self.history),
            }, tmp / "trainer.pt")
            atomic_write_text(tmp / CHECKSUMS, json.dumps({n: sha256_file(tmp / n) for n in CHECKPOINT_FILES}))
            shutil.rmtree(final, ignore_errors=True)
            fault_point("step-dir:before-rename")
            tmp.rename(final)
            atomic_write_text(self.dir / "LATEST", final.name)
            keep = {final.name, *self._checkpoints()[-2:]}
            for old in self.dir.glob("step-*"):
                if old.name not in keep:
                    shutil.rmtree(old, ignore_errors=True)

    def _checkpoints(self) -> list[str]:
        """Complete checkpoint folders, oldest first."""
        return sorted(p.name for p in self.dir.glob("step-*") if (p / CHECKSUMS).exists())

    def _verify(self, ckpt: Path) -> str | None:
        """Why checkpoint ``ckpt`` cannot be used, or None when every file matches its sha256."""
        try:
            sums = json.loads((ckpt / CHECKSUMS).read_text())
        except (OSError, ValueError) as e:
            return f"{ckpt / CHECKSUMS} is unreadable ({e})"
        for name in CHECKPOINT_FILES:
            if not (ckpt / name).exists():
                return f"{ckpt / name} is missing"
            if sha256_file(ckpt / name) != sums.get(name):
                return f"{ckpt / name} is damaged (sha256 differs from the one recorded when it was written)"
        return None

    def resume(self) -> bool:
        """Restore the newest checkpoint that verifies; say so when a damaged newer one is skipped."""
        latest = self.dir / "LATEST"
        names = self._checkpoints()
        if latest.exists() and latest.read_text().strip() not in names and (self.dir / latest.read_text().strip()).is_dir():
            names.append(latest.read_text().strip())  # written by an older lolcats: no checksums
        for name in reversed(names):
            ckpt = self.dir / name
            why = self._verify(ckpt) if (ckpt / CHECKSUMS).exists() else None
            if why is not None:
                logger.warning("%s: resume checkpoint %s is unusable: %s; falling back to the one before it",
                               self.spec.name, name, why)
                continue
            self._load_weights(ckpt / "weights.safetensors")
            state = torch.load(ckpt / "trainer.pt", weights_only=True)
            self.optimizer.load_state_dict(state["optimizer"])
            if self.scheduler and state["scheduler"] is not None:
                self.scheduler.load_state_dict(state["scheduler"])
            torch.set_rng_state(state["rng"])
            self.step, self.tokens, self.seconds = state["step"], state["tokens"], state["seconds"]
            self.best_eval, self.best_step = state["best_eval"], state["best_step"]
            self.history = json.loads(state["history"])
            logger.info("%s: resumed at optimizer step %d from %s", self.spec.name, self.step, ckpt)
            return True
        if names:
            logger.warning("%s: no resume checkpoint in %s verifies; starting the stage again", self.spec.name, self.dir)
        return False

    # -------------------------------------------------------------------------------- loop
    def _batch(self, micro_step: int) -> tuple[Tensor, Tensor]:
        n = len(self.data)
        epoch, i = divmod(micro_step, n)
        return self.data[epoch_order(n, self.seed, epoch)[i]]

    def _evaluate(self) -> float:
        loss = self.spec.eval_fn()  # every rank evaluates (same weights, same result), rank 0 writes
        if loss < self.best_eval:
            self.best_eval, self.best_step = loss, self.step
            if self.main:
                atomic_save_safetensors(self._weights(), self.dir / "best.safetensors")
                atomic_write_text(self.dir / "best.json", json.dumps(
                    {"step": self.step, "sha256": sha256_file(self.dir / "best.safetensors")}))
            if self.dp:
                distributed.barrier()
        if self.scheduler:
            self.scheduler.step(loss)
        record = {"stage": self.spec.name, "step": self.step, "eval_loss": loss,
                  "lr": self.optimizer.param_groups[0]["lr"]}
        self.history.append(record)
        if self.main:
            self.log(record)
        return loss

    def run(self) -> StageResult:
        spec, loop, max_steps = self.spec, self.loop, self.max_steps
        self.resume()
        params = list(spec.params.values())
        rank, size = distributed.world() if self.dp else (0, 1)
        if self.dp:
            logger.info("%s: data-parallel over %d processes (rank %d takes micro-batches %d, %d+%d, …)",
                        spec.name, size, rank, rank, rank, size)
        while self.step < max_steps:
            start = time.perf_counter()
            self.optimizer.zero_grad(set_to_none=True)
            total, extras, tokens = 0.0, {}, 0
            for micro in range(loop.grad_accum):
                if micro % size != rank:  # data parallel: this rank's share of the global batch
                    continue
                micro_step = self.step * loop.grad_accum + micro
                fault_point(f"{spec.name}:micro{micro_step}")
                input_ids, labels = self._batch(micro_step)
                loss, extra = spec.loss_fn(input_ids, labels)
                release_heap()  # the forward pass's freed intermediates, before the backward pass allocates
                if fault_point(f"{spec.name}:micro{micro_step}:loss"):  # a test asks for a non-finite loss here
                    loss = loss * float("nan")
                if not self.dp and not torch.isfinite(loss):
                    raise TrainingError(
                        f"{spec.name}: loss became {loss.item()} at optimizer step {self.step + 1} "
                        f"(micro-step {micro_step}); the last good checkpoint is step {self._last_saved()} in "
                        f"{self.dir}. Lower the learning rate or check the data, then rerun to resume.")
                (loss / loop.grad_accum).backward()
                total += loss.item() / loop.grad_accum
                for k, v in extra.items():
                    extras[k] = extras.get(k, 0.0) + v / loop.grad_accum
                tokens += input_ids.shape[0] * input_ids.shape[1]  # ids (B, T) or hidden states (B, T, D)
            if self.dp:
                total, extras, tokens = self._reduce(params, total, extras, tokens)
                if not math.isfinite(total):
                    raise TrainingError(f"{spec.name}: loss became {total} at optimizer step {self.step + 1}; the "
                                        f"last good checkpoint is step {self._last_saved()} in {self.dir}. Lower the "
                                        "learning rate or check the data, then rerun to resume.")
            self.tokens += tokens
            if loop.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(params, loop.max_grad_norm)
            self.optimizer.step()
            release_heap()  # the backward pass's, before the next step
            self.step += 1
            self.seconds += time.perf_counter() - start
            record = {"stage": spec.name, "step": self.step, "loss": total,
                      "lr": self.optimizer.param_groups[0]["lr"], "tokens": self.tokens, **extras}
            if self.main:
                self.log(record)
            if self.progress and self.main:
                self.progress(self.step, self.tokens, record)
            if self.step % loop.eval_every == 0 or self.step == max_steps:
                self._evaluate()
            if self.step % loop.checkpoint_every == 0 or self.step == max_steps:
                self.save()
        if max_steps == 0 and not self.history:
            self._evaluate()
        if (self.dir / "best.safetensors").exists() and self.best_step != self.step:
            logger.info("%s: restoring best held-out checkpoint (step %d, loss %.4g)", spec.name,
                        self.best_step, self.best_eval)
            best = self.dir / "best.safetensors"
            record = json.loads((self.dir / "best.json").read_text()) if (self.dir / "best.json").exists() else {}
            if record.get("sha256", sha256_file(best)) != sha256_file(best):
                raise TrainingError(f"{best} is damaged (sha256 differs from the one recorded when it was written); "
                                    f"delete {self.dir} to train the stage again")
            self._load_weights(best)
        return StageResult(self.step, self.tokens, self.seconds, self.best_step, self.best_eval, self.history)

    def _reduce(self, params: list[nn.Parameter], total: float, extras: dict[str, float], tokens: int
                ) -> tuple[float, dict[str, float], int]:
        """Sum gradients, loss, logged extras and token counts over the ranks."""
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            distributed.all_reduce_sum(p.grad)
        keys = sorted(extras)
        stats = distributed.all_reduce_sum(torch.tensor([total, tokens, *(extras[k] for k in keys)],
                                                        dtype=torch.float64))
        return stats[0].item(), {k: stats[2 + i].item() for i, k in enumerate(keys)}, int(stats[1].item())

    def _last_saved(self) -> int:
        latest = self.dir / "LATEST"
        return int(latest.read_text().strip().split("-")[1]) if latest.exists() else 0
