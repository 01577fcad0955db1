"""The one progress protocol every long step reports through (training stages, evaluations, block-by-block
steps). Library code only calls it; the CLI draws it as tqdm bars, and without a front end it logs."""

from __future__ import annotations

import logging
from typing import Protocol

logger = logging.getLogger(__name__)


class Progress(Protocol):
    """A front end for long steps: one ``start`` … ``update``* … ``end`` per step, steps one after another."""

    def start(self, stage: str, total: int, unit: str = "step") -> None:
        """A step named ``stage`` begins; ``total`` units (optimizer steps, windows, layers, items) are to come."""

    def update(self, done: int, tokens: int = 0, record: dict | None = None) -> None:
        """``done`` units so far (counting any a resumed step did before), ``tokens`` processed, last metrics."""

    def end(self) -> None:
        """The step finished."""


class LogProgress:
    """Progress without a front end: one log line when a step starts."""

    def start(self, stage: str, total: int, unit: str = "step") -> None:
        logger.info("%s: %d %ss", stage, total, unit)

    def update(self, done: int, tokens: int = 0, record: dict | None = None) -> None:
        pass

    def end(self) -> None:
        pass
