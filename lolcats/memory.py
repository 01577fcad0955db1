"""The memory model behind ``lolcats plan`` (docs/memory.md): what each stage holds per device, from the model's
config alone (a skeleton on the meta device, no weights).

One formula for every model. Weights are counted from the skeleton's parameters; gradients and AdamW state from
the trainable ones (float32: both moments, no master copy, since what trains is float32 already); activations
per token and layer are the tensors our own forward passes keep for the backward pass, term by term (the chunked
linear attention of :mod:`lolcats.ops.chunked` in float32, the MLP and norms in the model's dtype), and the
next-token loss's float32 logits. A micro-batch is one chunk of ``data.seq_len`` tokens.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch
from torch import nn

FP32 = 4  # bytes: linearized attention computes in float32, trainable weights are float32


@dataclass(frozen=True)
class Shapes:
    """What the formula reads from a model config and the recipe (symbols of docs/memory.md).

    Attributes:
        layers, linearized: decoder layers L, and how many of them are linearized (the rest stay softmax).
        hidden, intermediate: d, and I the MLP width a token passes through (expert width × experts per token
            for a mixture of experts).
        heads, kv_heads, head_dim, vocab: H, H_kv, D_h, V.
        feature_dim: F, the width of φ(q) and φ(k) (2f for Hedgehog).
        chunk, near, sinks: the chunked form's query chunk C, exactly scored keys per chunk K (the chunk and the
            ones the window reaches back to) and sink tokens s.
        decay: the linear part decays (one more float32 tensor per feature map is kept).
        near_linear: some of the K near keys fall in the linear part (a C × K φ product per chunk is kept).
        dtype_bytes: e, bytes per element of the base weights and of the layers' own activations.
        base_params: every frozen parameter (every expert of a mixture counts), in the model's dtype.
        layer_params, rest_params: the frozen parameters of the largest decoder layer, and those outside the decoder
            layers (embeddings, final norm, head; tied ones once): the units a sharded run gathers whole.
        attention_params: stage 1's trainable feature maps, window factors and decays (float32).
        lora_params, lora_rank: stage 2's adapters (float32) and r.
        lora_qkv, lora_o: LoRA targets per layer reading the attention input (3 for q/k/v, 1 for a fused qkv),
            and whether o_proj is one.
    """

    layers: int
    linearized: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    feature_dim: int
    chunk: int
    near: int
    sinks: int
    decay: bool
    near_linear: bool
    dtype_bytes: int
    base_params: int
    attention_params: int
    lora_params: int
    lora_rank: int
    lora_qkv: int
    lora_o: bool
    layer_params: int = 0
    rest_params: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


def skeleton(cfg: Any, model_config: str | None = None, recipe_dir: Path | None = None
             ) -> tuple[Any, str, nn.Module]:
    """(HF config, where it was read, the converted model on the meta device) for a recipe: nothing is allocated.

    Args:
        cfg: the recipe (:class:`lolcats.config.LolcatsConfig`).
        model_config: a config.json (default ``blockwise.model_config``, else the model's folder).
        recipe_dir: where relative ``blockwise.model_config`` paths are looked up when not found from here.
    """
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    from lolcats.convert import convert_model
    from lolcats.sources import resolve_model

    trust = cfg.model.trust_remote_code
    source = model_config or cfg.blockwise.model_config
    if source and not Path(source).expanduser().exists() and recipe_dir is not None:
        source = str(recipe_dir / source)
    source = source or resolve_model(cfg.model.name_or_path)
    path = Path(source).expanduser()
    if path.is_file():
        hf_config = AutoConfig.from_pretrained(str(path.parent) if path.name == "config.json" else str(path),
                                               trust_remote_code=trust)
    elif (path / "config.json").exists():
        hf_config = AutoConfig.from_pretrained(str(path), trust_remote_code=trust)
    else:
        raise FileNotFoundError(f"no model config at {source}; set blockwise.model_config to a local config.json or "
                                "pass --model-config (plan needs only the config, never the weights)")
    with init_empty_weights(), torch.device("meta"):  # shapes only: nothing is allocated or initialised
        model = AutoModelForCausalLM.from_config(hf_config, trust_remote_code=trust)
    model.tie_weights()  # outside init_empty_weights, which would re-create the tied tensor as a second one
    with init_empty_weights(), torch.device("meta"):
        convert_model(model, cfg.attention.training())  # what the stages train
    return hf_config, str(source), model


def shapes(cfg: Any, hf_config: Any, model: nn.Module) -> Shapes:
    """The :class:`Shapes` of a converted skeleton (or real model) under a recipe."""
    from lolcats.attention import LolcatsAttention, find_decoder_layers
    from lolcats.base_model import DTYPES
    from lolcats.convert import TRAINABLE_KEYS, trainable_attention_parameters
    from lolcats.finetune import lora_targets

    layers = find_decoder_layers(model)
    linear = [m for m in model.modules() if isinstance(m, LolcatsAttention)]
    trainable = sum(p.numel() for p in trainable_attention_parameters(model).values())
    attention_all = sum(p.numel() for m in linear for n, p in m.named_parameters() if n.split(".")[0] in TRAINABLE_KEYS)
    base = sum(p.numel() for p in model.parameters()) - attention_all

    def frozen(module: nn.Module) -> int:
        return sum(p.numel() for n, p in module.named_parameters()
                   if not any(part in TRAINABLE_KEYS for part in n.split(".")))

    in_layers = sum(frozen(layer) for layer in layers)
    layer_params = max((frozen(layer) for layer in layers), default=0)
    targets = lora_targets(model, cfg.lora)
    lora = sum(cfg.lora.r * (m.in_features + m.out_features) for name, m in model.named_modules()
               if isinstance(m, nn.Linear) and name.split(".")[-1] in targets)
    heads = hf_config.num_attention_heads
    head_dim = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // heads
    a = cfg.attention
    chunk, near, near_linear = near_keys(linear[0].spec) if linear else (a.chunk_size, a.chunk_size, False)
    experts = getattr(hf_config, "num_experts_per_tok", None) or 1
    return Shapes(
        layers=len(layers), linearized=len(linear), hidden=hf_config.hidden_size,
        intermediate=hf_config.intermediate_size * experts, heads=heads,
        kv_heads=getattr(hf_config, "num_key_value_heads", None) or heads, head_dim=head_dim,
        vocab=hf_config.vocab_size, feature_dim=linear[0].feature_map_q.out_dim if linear else 2 * a.feature_dim,
        chunk=chunk, near=near, sinks=a.sink_tokens, decay=a.decay, near_linear=near_linear,
        dtype_bytes=DTYPES[cfg.model.dtype].itemsize, base_params=base, attention_params=trainable,
        lora_params=lora, lora_rank=cfg.lora.r, lora_qkv=sum(t in targets for t in ("q_proj", "k_proj", "v_proj",
                                                                                     "qkv_proj")),
        lora_o="o_proj" in targets, layer_params=layer_params, rest_params=base - in_layers)


def near_keys(spec: Any) -> tuple[int, int, bool]:
    """(C, K, near_linear) of the chunked form on unpadded training chunks (:func:`lolcats.ops.chunked.
    hybrid_attention_chunked`): K = (n_prev + 1) · C keys per query chunk, n_prev = ⌈look-back / C⌉; near_linear
    when any of them is in the linear part (then a C × K φ product per chunk is computed and kept)."""
    c = spec.chunk_size
    n_prev = math.ceil(spec.shape.aligned_lookback(c) / c)
    span = (n_prev + 1) * c
    cycle = math.lcm(c, spec.window_size)  # window blocks repeat with this period
    linear = False
    for start in range(n_prev * c, n_prev * c + cycle, c):
        q = torch.arange(start, start + c)
        k = torch.arange(start + c - span, start + c)
        _, lin = spec.masks(q, k, sinks_apart=True)
        linear = linear or bool(lin.any())
    return c, span, linear


# ---------------------------------------------------------------------------------------------- activations
def attention_elements(s: Shapes, stage: int) -> float:
    """Float32 elements one linearized layer keeps per token for the backward pass of ``stage`` (1 or 2):
    the chunked form's saved tensors (docs/memory.md lists each)."""
    h, d, f, c = s.heads, s.head_dim, s.feature_dim, s.chunk
    near = s.near + s.sinks
    if stage == 2:  # q, k, v carry gradients (LoRA); feature maps, γ and λ are frozen
        n = (4 * h * f  # φ(q), φ(k): both softmax outputs and the two products that read them
             + 3 * h * d  # q for the scores, v repeated for the chunk states, the numerator
             + 2 * h * near * d / c  # near keys and values, one copy per query chunk
             + 4 * h * near  # scores, shifted scores, their exponentials, the masked weights
             + h * f * d / c)  # the running linear state per chunk
        n += 2 * s.kv_heads * d if s.sinks else 0  # k and v, read by the sink gather
    else:  # only the feature maps, γ (and λ) carry gradients; q, k, v are constants
        n = (3 * h * d  # q and the repeated k (feature-map inputs), v repeated
             + (5 if s.decay else 3) * h * f  # φ(q), φ(k), and the decayed / masked copies the products read
             + (2 if s.decay else 1) * h * f * d / c  # the chunk states (with decay also before the running sum)
             + h * near * d / c  # near values
             + 2 * h * near  # shifted scores and their exponentials
             + 2 * h * d)  # the numerator and the error against the teacher
    if s.near_linear:
        n += h * s.near * f / c + h * f  # near φ(k) per chunk, φ(q) for its product
    return n


def layer_bytes(s: Shapes, stage: int, linearized: bool = True) -> float:
    """Bytes per token one decoder layer keeps for the backward pass without activation checkpointing."""
    if stage == 1:
        return FP32 * attention_elements(s, 1) if linearized else 0.0
    e, d = s.dtype_bytes, s.hidden
    lora_inputs = d * (s.lora_qkv if e < FP32 else min(s.lora_qkv, 1))  # adapters cast their input to float32
    out = (2 * d * FP32  # the two norms' inputs, upcast to float32
           + FP32 * (lora_inputs + (s.heads * s.head_dim if s.lora_o else 0))  # adapter inputs (float32)
           + FP32 * s.lora_rank * (s.lora_qkv + s.lora_o)  # adapter A outputs
           + 3 * s.intermediate * e)  # MLP: gate, its activation, up
    if linearized:
        return out + FP32 * attention_elements(s, 2)
    return out + e * (2 * s.heads + 2 * s.kv_heads) * s.head_dim  # softmax attention: q, k, v and its output


def checkpoint_bytes(s: Shapes, stage: int) -> float:
    """Bytes per token one layer keeps with activation checkpointing: stage 2 the layer's input (model dtype),
    stage 1 a linearized layer's q, k, v and the teacher's output (float32)."""
    if stage == 2:
        return s.dtype_bytes * s.hidden
    return FP32 * (2 * s.heads + 2 * s.kv_heads) * s.head_dim


def logits_bytes(s: Shapes) -> float:
    """Bytes per token of stage 2's next-token loss at its peak: float32 log-probabilities over the vocabulary
    and, early in the backward pass, their gradient and the logits' gradient."""
    return 3 * FP32 * s.vocab + FP32 * s.hidden


def activation_bytes(s: Shapes, stage: int, tokens: int, checkpointing: bool, layers: int | None = None) -> float:
    """Peak activation bytes of one micro-batch of ``tokens`` tokens (``layers``: only that many, e.g. one block).

    Without checkpointing every layer's tensors are held at the end of the forward pass (stage 2: with the
    logits'). With it each layer keeps :func:`checkpoint_bytes` and one layer at a time runs again in the
    backward pass, holding :func:`layer_bytes` (stage 2: after the logits' gradient is gone)."""
    lin = s.linearized if layers is None else min(layers, s.linearized)
    soft = (s.layers - s.linearized) if layers is None else max(0, layers - lin)
    one = max(layer_bytes(s, stage, True) if lin else 0.0, layer_bytes(s, stage, False) if soft else 0.0)
    if stage == 1:
        per_token = lin * checkpoint_bytes(s, 1) + one if checkpointing else lin * layer_bytes(s, 1)
    elif checkpointing:
        per_token = (lin + soft) * checkpoint_bytes(s, 2) + max(logits_bytes(s), one)
    else:
        per_token = lin * layer_bytes(s, 2) + soft * layer_bytes(s, 2, False) + logits_bytes(s)
    return tokens * per_token


# ---------------------------------------------------------------------------------------------- per stage
@dataclass(frozen=True)
class StageMemory:
    """Bytes one device holds for a stage: ``weights`` (base and trainable), ``gradients`` and ``optimizer``
    (AdamW's two float32 moments) of the ``trainable`` parameters, and ``activations`` (one micro-batch).
    ``base`` is the frozen base's part of ``weights``, the part sharding divides, and ``gathered`` what a sharded
    rank holds whole at once: the unit outside the decoder layers (held through a forward pass) and two decoder
    layers (the one running and the next, prefetched)."""

    trainable: int
    weights: float
    gradients: float
    optimizer: float
    activations: float
    base: float = 0.0
    gathered: float = 0.0

    @property
    def total(self) -> float:
        return self.weights + self.gradients + self.optimizer + self.activations

    def sharded(self, devices: int) -> StageMemory:
        """As ``model.sharding: fsdp`` runs over ``devices`` (:mod:`lolcats.sharding`): each rank holds 1/N of the
        base plus the rest of the units it gathers; trainable weights, their gradients and AdamW state and the
        activations stay whole on every rank (the trainables train data-parallel)."""
        if devices == 1 or not self.base:
            return self
        base = self.base / devices + self.gathered * (1 - 1 / devices)
        return StageMemory(self.trainable, self.weights - self.base + base, self.gradients, self.optimizer,
                           self.activations, base, self.gathered)

    def devices_for(self, capacity: float) -> int | None:
        """Fewest devices of ``capacity`` bytes the run fits on, sharded when one is not enough (None: what every
        rank holds whole does not fit)."""
        if self.total <= capacity:
            return 1
        room = capacity - (self.total - self.base) - self.gathered
        if room <= 0 or not self.base:
            return None
        return max(2, math.ceil((self.base - self.gathered) / room))

    def to_dict(self) -> dict[str, float]:
        return {"trainable": self.trainable, "weights": self.weights, "gradients": self.gradients,
                "optimizer": self.optimizer, "activations": self.activations, "total": self.total,
                "base": self.base, "gathered": self.gathered}


def stage_memory(s: Shapes, stage: int, tokens: int, checkpointing: bool, layers: int | None = None,
                 base_params: int | None = None) -> StageMemory:
    """One device's memory for stage ``stage`` (1: attention transfer, 2: LoRA) on micro-batches of ``tokens``.

    Args:
        layers, base_params: a part of the model only (one block of block-by-block stage 1): its decoder layers
            and its frozen parameters; default the whole model.
    """
    frac = 1.0 if layers is None else min(layers, s.linearized) / max(s.linearized, 1)
    attention = round(s.attention_params * frac)
    base = s.base_params if base_params is None else base_params
    weights = base * s.dtype_bytes + FP32 * attention
    trainable = attention if stage == 1 else s.lora_params
    if stage == 2:
        weights += FP32 * s.lora_params
    whole = layers is None  # a block of block-by-block stage 1 trains in one process, unsharded
    gathered = s.dtype_bytes * (s.rest_params + 2 * s.layer_params) if whole else 0.0
    return StageMemory(trainable, weights, FP32 * trainable, 2 * FP32 * trainable,
                       activation_bytes(s, stage, tokens, checkpointing, layers),
                       base * s.dtype_bytes if whole else 0.0, min(gathered, base * s.dtype_bytes))
