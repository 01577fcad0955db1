"""The recipe's sections as dataclasses (built by :func:`lolcats.schema.from_dict`): YAML is data; unknown keys
are errors listing the valid ones."""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass, field
from typing import Any

from lolcats.attention_config import AttentionConfig
from lolcats.report_config import ReportConfig
from lolcats.schema import check_choice, check_int, check_number, from_dict

__all__ = ["AttentionConfig", "BlockwiseConfig", "DataConfig", "DistillConfig", "LolcatsConfig", "LoopConfig",
           "LoraConfig", "ModelConfig", "ReportConfig", "from_dict", "load_config"]


@dataclass
class ModelConfig:
    """The base model.

    Attributes:
        name_or_path: an HF folder or hub id, a ``.gguf`` file, or ``lolcats:smollm2-135m-instruct``
            (the offline default fetched by the set-up).
        dtype: ``float32``, ``bfloat16`` or ``float16``.
        device: ``cpu``, ``cuda``, ``cuda:N`` or ``auto`` (cuda when available).
        attn_implementation: the teacher's softmax: ``sdpa``, ``eager`` or ``flash_attention_2``.
        trust_remote_code: only when you trust the checkpoint's code.
        sharding: ``none``, or ``fsdp``: under torchrun / ``accelerate launch`` each rank holds 1/N of the base
            weights (FSDP2, one unit per decoder layer) and reads only its rows from the checkpoint
            (:mod:`lolcats.sharding`); in one process it changes nothing.
    """

    name_or_path: str = "lolcats:smollm2-135m-instruct"
    dtype: str = "float32"
    device: str = "auto"
    attn_implementation: str = "sdpa"
    trust_remote_code: bool = False
    sharding: str = "none"

    def __post_init__(self) -> None:
        check_choice("model.dtype", self.dtype, ("float32", "bfloat16", "float16"))
        check_choice("model.sharding", self.sharding, ("none", "fsdp"))
        check_choice("model.attn_implementation", self.attn_implementation, ("sdpa", "eager", "flash_attention_2"))
        if not (self.device in ("cpu", "cuda", "auto") or self.device.startswith("cuda:")):
            raise ValueError(f"model.device={self.device!r} is not valid; use cpu, cuda, cuda:N or auto")


@dataclass
class DataConfig:
    """Training and evaluation text.

    Attributes:
        train: a folder of .txt/.jsonl files, an Alpaca-format .json/.jsonl file, ``hf:NAME`` (a
            ``datasets`` name, online only) or ``lolcats:sotu``.
        train_filter: for ``lolcats:sotu`` style corpora, keep files whose name sorts before this
            (e.g. ``2000`` keeps addresses before 2000); empty keeps all.
        eval_in_domain: held-out documents of the training corpus (same forms as ``train``).
        eval_in_domain_filter: keep files whose name sorts at or after this (e.g. ``2008``).
        eval_out_of_domain: a corpus never trained on (``lolcats:moby_dick``).
        seq_len: packed chunk length in tokens (the training length of both stages).
        heldout_chunks: chunks of the training stream kept out for stage-1 held-out loss.
        max_train_chunks: keep only the first this many training chunks (0 = all); the held-out
            chunks stay the last of the whole stream.
        eval_windows: windows of ``eval_seq_len`` tokens per evaluation corpus for the report.
        eval_seq_len: length of the report's perplexity windows, whatever ``seq_len`` is (``eval_in_domain:
            heldout`` keeps the held-out training chunks, of ``seq_len`` tokens).
        max_position_offset: training chunks start at a position in [0, this], drawn per chunk (0 = at 0), so
            the feature maps meet the rotary angles of long contexts (:mod:`lolcats.positions`).
        instruction_template: prompt template for Alpaca-format data.
    """

    train: str = "lolcats:sotu"
    train_filter: str = "2000"
    eval_in_domain: str = "lolcats:sotu"
    eval_in_domain_filter: str = "2008"
    eval_out_of_domain: str = "lolcats:moby_dick"
    seq_len: int = 1024
    heldout_chunks: int = 4
    max_train_chunks: int = 0
    eval_windows: int = 6
    eval_seq_len: int = 1024
    max_position_offset: int = 0
    instruction_template: str = "alpaca"

    def __post_init__(self) -> None:
        check_int("data.seq_len", self.seq_len)
        check_int("data.heldout_chunks", self.heldout_chunks)
        check_int("data.eval_windows", self.eval_windows)
        check_int("data.eval_seq_len", self.eval_seq_len)
        check_int("data.max_train_chunks", self.max_train_chunks, 0, " (0 = all)")
        check_int("data.max_position_offset", self.max_position_offset, 0, " (0 = chunks start at position 0)")
        check_choice("data.instruction_template", self.instruction_template, ("alpaca",))


@dataclass
class LoopConfig:
    """The training loop's settings (:class:`lolcats.training.Trainer`), shared by the stage sections.

    Attributes:
        max_steps: optimizer steps (0 skips the stage).
        epochs: when > 0, passes over the training chunks instead of ``max_steps``.
        grad_accum: micro-batches (of one chunk each) per optimizer step.
        lr, weight_decay: AdamW.
        eval_every: optimizer steps between held-out evaluations.
        checkpoint_every: optimizer steps between resume checkpoints.
        max_grad_norm: global-norm clipping (0 = off).
        activation_checkpointing: keep only each layer's inputs for the backward pass and recompute the rest
            during it (``torch.utils.checkpoint``): in stage 2 every decoder layer, in stage 1 every layer's
            student attention and loss. Less memory for about one more forward pass of those parts; the same
            weights either way, so a run may resume with the other setting.
    """

    section: typing.ClassVar[str] = "loop"  # the recipe section, named in messages

    max_steps: int = 100
    epochs: float = 0.0
    grad_accum: int = 8
    lr: float = 1e-4
    weight_decay: float = 0.0
    eval_every: int = 50
    checkpoint_every: int = 10
    max_grad_norm: float = 0.0
    activation_checkpointing: bool = True

    def __post_init__(self) -> None:
        s = self.section
        if not isinstance(self.activation_checkpointing, bool):
            raise ValueError(f"{s}.activation_checkpointing={self.activation_checkpointing!r} must be true or false")
        if self.max_steps < 0 or self.epochs < 0:
            raise ValueError(f"{s}.max_steps={self.max_steps} and {s}.epochs={self.epochs} must be >= 0")
        for name in ("grad_accum", "eval_every", "checkpoint_every"):
            check_int(f"{s}.{name}", getattr(self, name))
        check_number(f"{s}.lr", self.lr, strict=True)
        for name in ("weight_decay", "max_grad_norm", "epochs"):
            check_number(f"{s}.{name}", getattr(self, name))

    def steps(self, train_chunks: int) -> int:
        """Optimizer steps: ``epochs`` over ``train_chunks`` chunks when set, else ``max_steps``."""
        if self.epochs > 0:
            return max(1, math.ceil(self.epochs * train_chunks / self.grad_accum))
        return self.max_steps

    def plateau(self) -> dict[str, float] | None:
        """ReduceLROnPlateau's ``patience``, ``factor`` and ``min_lr``; None keeps the learning rate constant."""
        return None


@dataclass
class DistillConfig(LoopConfig):
    """Stage 1, attention transfer (docs/design.md §3): the loop settings of :class:`LoopConfig` and

    Attributes:
        mse_scale: the loss is ``mse_scale`` × mean over layers of the per-layer MSE.
        attention_ce_weight: weight of Hedgehog's cross-entropy on attention weights (0 = off).
        scheduler: ``plateau`` (ReduceLROnPlateau on the held-out evaluations) or ``constant``.
        plateau_patience, plateau_factor, min_lr: ReduceLROnPlateau.
    """

    section: typing.ClassVar[str] = "distill"

    max_steps: int = 200
    lr: float = 1e-2
    eval_every: int = 100
    mse_scale: float = 1000.0
    attention_ce_weight: float = 0.0
    scheduler: str = "plateau"
    plateau_patience: int = 10
    plateau_factor: float = 0.1
    min_lr: float = 1e-5

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int("distill.plateau_patience", self.plateau_patience)
        check_choice("distill.scheduler", self.scheduler, ("plateau", "constant"))
        check_number("distill.min_lr", self.min_lr)
        check_number("distill.plateau_factor", self.plateau_factor, strict=True, high=1.0)
        for name in ("mse_scale", "attention_ce_weight"):
            check_number(f"distill.{name}", getattr(self, name))

    def plateau(self) -> dict[str, float] | None:
        if self.scheduler != "plateau":
            return None
        return {"patience": self.plateau_patience, "factor": self.plateau_factor, "min_lr": self.min_lr}


@dataclass
class LoraConfig(LoopConfig):
    """Stage 2, LoRA repair (peft): the loop settings of :class:`LoopConfig` (constant learning rate) and

    Attributes:
        r, alpha, dropout: LoRA rank, scaling numerator and dropout.
        target_modules: projection names; empty means the family's q/k/v/o (``qkv_proj``/``o_proj``
            for Phi-3).
        loss: ``next_token`` (cross-entropy on the data) or ``kl``: distil the original softmax model,
            KL(original ‖ linearized) of the next-token distributions (held-out loss and the best
            checkpoint stay next-token).
        kl_temperature: T of the ``kl`` loss: both distributions are softened by T and the KL scaled by T².
    """

    section: typing.ClassVar[str] = "lora"
    losses: typing.ClassVar[tuple[str, ...]] = ("next_token", "kl")

    max_grad_norm: float = 1.0
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=list)
    loss: str = "next_token"
    kl_temperature: float = 1.0

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int("lora.r", self.r)
        if not 0 <= self.dropout < 1:
            raise ValueError(f"lora.dropout={self.dropout} must be in [0, 1)")
        check_number("lora.alpha", self.alpha, strict=True)
        check_choice("lora.loss", self.loss, self.losses)
        check_number("lora.kl_temperature", self.kl_temperature, strict=True)


@dataclass
class BlockwiseConfig:
    """Block-by-block stage 1 for models too large to train whole (docs/blockwise.md; paper §3.3).

    Attributes:
        block_size: k, decoder layers per block; the L layers split into ceil(L / k) blocks.
        hidden_dir: where precompute writes the block-input hidden states (default ``<out_dir>/blockwise/hidden``).
        shard_dtype: dtype of the stored hidden states (``bfloat16`` halves the disk need).
        chunks_per_shard: packed chunks per shard file.
        max_inflight_chunks: precompute holds at most this many chunks' hidden states in memory,
            in waves that each stream the layers again (0: all chunks in one pass).
        tokens: token count ``blockwise plan`` uses for its disk estimate when no data is tokenised
            (0: count the recipe's training data).
        model_config: a local ``config.json`` for ``plan`` when the model itself is not on disk
            (relative paths are read from the recipe's folder).
    """

    block_size: int = 1
    hidden_dir: str = ""
    shard_dtype: str = "bfloat16"
    chunks_per_shard: int = 64
    max_inflight_chunks: int = 0
    tokens: int = 0
    model_config: str = ""

    def __post_init__(self) -> None:
        check_int("blockwise.block_size", self.block_size)
        check_int("blockwise.chunks_per_shard", self.chunks_per_shard)
        check_int("blockwise.max_inflight_chunks", self.max_inflight_chunks, 0, " (0 = all at once)")
        check_choice("blockwise.shard_dtype", self.shard_dtype, ("bfloat16", "float16", "float32"))
        check_int("blockwise.tokens", self.tokens, 0)


@dataclass
class LolcatsConfig:
    """A whole linearization run: one recipe YAML."""

    out_dir: str = "out/run"
    seed: int = 0
    threads: int = 0
    model: ModelConfig = field(default_factory=ModelConfig)
    attention: AttentionConfig = field(default_factory=AttentionConfig)
    data: DataConfig = field(default_factory=DataConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    blockwise: BlockwiseConfig = field(default_factory=BlockwiseConfig)
    report: ReportConfig = field(default_factory=ReportConfig)

    def __post_init__(self) -> None:
        if not isinstance(self.out_dir, str) or not self.out_dir.strip():
            raise ValueError(f"out_dir={self.out_dir!r} is empty; set out_dir to a folder for the run's results "
                             "(e.g. out_dir=out/my_run)")
        for name in ("seed", "threads"):
            check_int(name, getattr(self, name), 0)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def steps(self, stage: LoopConfig, train_chunks: int) -> int:
        """Optimizer steps of a stage (:meth:`LoopConfig.steps`)."""
        return stage.steps(train_chunks)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LolcatsConfig:
        return from_dict(cls, data)


def _yaml(text: str, where: str) -> Any:
    import yaml

    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ValueError(f"{where} is not valid YAML{at} ({problem}); fix the syntax") from None


def _parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise ValueError(f"override {text!r} must look like key=value, e.g. distill.max_steps=10")
    key, raw = text.split("=", 1)
    keys = key.strip().split(".")
    if not all(keys):
        raise ValueError(f"override {text!r} has an empty key; write section.key=value, e.g. distill.max_steps=10")
    return keys, _yaml(raw, f"override {text!r}") if raw.strip() else ""


REQUIRED = (("out_dir",), ("model", "name_or_path"))


def load_config(path: str | None = None, overrides: typing.Sequence[str] = ()) -> LolcatsConfig:
    """Read a recipe YAML and apply ``key=value`` overrides (dotted keys).

    The recipe (with its overrides) must name at least ``out_dir`` and ``model.name_or_path``: an empty
    recipe never silently runs a default job. With ``path`` None the overrides alone are the recipe.
    """
    from pathlib import Path

    data: dict[str, Any] = {}
    where = "the overrides"
    if path is not None:
        p = Path(path).expanduser()
        if not p.is_file():
            raise FileNotFoundError(f"recipe {path} does not exist; see recipes/ for the shipped ones")
        try:
            text = p.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise ValueError(f"recipe {path} is not a text file; give a YAML recipe such as "
                             "recipes/smollm2_135m.yaml") from None
        data = _yaml(text, f"recipe {path}") or {}
        if not isinstance(data, dict):
            raise ValueError(f"recipe {path} must be a YAML mapping at the top level")
        where = f"recipe {path}"
    for text in overrides:
        keys, value = _parse_override(text)
        node = data
        for k in keys[:-1]:
            node = node.setdefault(k, {})
            if not isinstance(node, dict):
                raise ValueError(f"override {text!r}: {k} is not a section")
        node[keys[-1]] = value
    missing = []
    for keys in REQUIRED:
        node: Any = data
        for k in keys:
            node = node.get(k) if isinstance(node, dict) else None
        if node is None:
            missing.append(".".join(keys))
    if missing:
        raise ValueError(f"{where} does not name {' and '.join(missing)}; every recipe sets at least out_dir and "
                         "model.name_or_path (see recipes/tiny_llama.yaml)")
    return LolcatsConfig.from_dict(data)
