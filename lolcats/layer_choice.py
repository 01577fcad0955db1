"""Which layers to keep as softmax attention (``attention.softmax_layers: N``), measured after stage 1.

Stage 1 trains every layer alone against its own softmax output (the teacher's output flows on), so its
result does not depend on which layers later run as softmax: the choice is made after it, from the trained
model, and only stage 2 depends on it. A layer is *restored* by putting the model's own attention module back
around the linearized layer's projections (:func:`softmax_module`): exactly the module a conversion with
``attention.skip_layers`` keeps, so the restored model is the one :func:`lolcats.load` rebuilds and decodes
with an ordinary key/value cache in that layer.

Two criteria, both measured on the held-out chunks (docs/design.md §3, "Softmax layers"):

* ``kl_drop``: KL(original ‖ stage-1 model) minus KL(original ‖ stage-1 model with layer ℓ alone restored),
  the mean over predicted tokens of the next-token distributions. It measures what the choice is for, error
  compounding through later layers included; cost: one forward pass per linearized layer per chunk.
* ``output_error``: teacher-forced like stage 1 (every layer's input is the original model's), the error the
  linearized layer writes into the residual stream relative to the residual stream itself,
  Σ‖o_proj(y_lin − y_softmax)‖² / Σ‖h_ℓ‖² over tokens (h_ℓ the residual entering layer ℓ). It is stage 1's
  attention MSE weighted by o_proj's gain on that error and by 1 / (the residual's power): one forward pass
  per chunk, but blind to how later layers amplify or absorb an error.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from lolcats.attention import LolcatsAttention, find_decoder_layers
from lolcats.attention_config import SOFTMAX_CRITERIA
from lolcats.data import Chunks
from lolcats.io import atomic_write_text
from lolcats.teacher import predicted, teacher_logits

logger = logging.getLogger(__name__)

# name -> what it ranks by (largest first); the first is what ``attention.softmax_criterion`` defaults to
CRITERIA = {
    "kl_drop": "drop of KL(original ‖ model) when the layer alone is restored to softmax",
    "output_error": "teacher-forced attention error through o_proj, relative to the residual stream",
}
assert tuple(CRITERIA) == SOFTMAX_CRITERIA  # the config validates against the same names


def check_softmax_layers(n: int, layers: int, what: str = "layers of the model") -> None:
    """ValueError naming ``attention.softmax_layers`` when it would keep every one of ``layers`` as softmax."""
    if n >= layers:
        raise ValueError(f"attention.softmax_layers={n} would keep all {layers} {what} as softmax attention, leaving "
                         f"nothing to linearize; give fewer than {layers} (0 = none)")


# ------------------------------------------------------------------------------------ restoring layers
def softmax_module(model: nn.Module, layer_idx: int) -> nn.Module:
    """The model's own attention module for decoder layer ``layer_idx``, rebuilt around the projections (and
    q/k norms) of the :class:`LolcatsAttention` there: the module a conversion skipping that layer keeps.

    The module's class comes from a decoder layer of the model's own class built on the meta device (nothing
    is allocated); every weight then comes from the linearized layer.
    """
    layer = find_decoder_layers(model)[layer_idx]
    attn = layer.self_attn
    if not isinstance(attn, LolcatsAttention):
        raise ValueError(f"layer {layer_idx} is not linearized ({type(attn).__name__}); only a linearized layer can "
                         "be restored to softmax")
    with torch.device("meta"):
        fresh = type(layer)(attn.hf_config or model.config, layer_idx).self_attn
    for name in attn.family.child_names():
        setattr(fresh, name, getattr(attn, name))
    left = [n for n, t in itertools.chain(fresh.named_parameters(), fresh.named_buffers()) if t.is_meta]
    if left:
        raise ValueError(f"layer {layer_idx}: {type(fresh).__name__} has {left[0]!r}, which the linearized layer "
                         f"does not keep; the {attn.family.name} adapter does not fit this model")
    return fresh.train(attn.training)


def _swap(model: nn.Module, modules: dict[int, nn.Module]) -> dict[int, nn.Module]:
    """Put ``modules[i]`` in place of decoder layer i's ``self_attn``; returns what was there."""
    layers = find_decoder_layers(model)
    old = {i: layers[i].self_attn for i in modules}
    for i, m in modules.items():
        layers[i].self_attn = m
    return old


@contextlib.contextmanager
def softmax_restored(model: nn.Module, modules: dict[int, nn.Module]) -> Iterator[nn.Module]:
    """Within the context, each layer i of ``modules`` (from :func:`softmax_module`) runs as softmax; the
    linearized layers are back on the way out, also after an exception."""
    old = _swap(model, modules)
    try:
        yield model
    finally:
        _swap(model, old)


def restore_softmax(model: nn.Module, layer_ids: Sequence[int]) -> None:
    """Turn linearized layers ``layer_ids`` back into the model's own softmax attention, for good (their feature
    maps leave the model; stage 1's weights of them stay in ``attention.safetensors``)."""
    _swap(model, {i: softmax_module(model, i) for i in layer_ids})
    logger.info("layers %s run as softmax attention", ", ".join(map(str, layer_ids)))


def linearized_ids(model: nn.Module) -> list[int]:
    return [i for i, layer in enumerate(find_decoder_layers(model)) if isinstance(layer.self_attn, LolcatsAttention)]


# ------------------------------------------------------------------------------------ criterion A
class _Original:
    """The original model's next-token distribution on one chunk, and KL(original ‖ a model) against it."""

    def __init__(self, model: nn.Module, input_ids: Tensor, labels: Tensor) -> None:
        self.input_ids, self.labels = input_ids, labels
        log_p = F.log_softmax(predicted(teacher_logits(model, input_ids), labels).float(), -1)  # (N, V)
        self.p = log_p.exp()
        self.neg_entropy = float((self.p * log_p).sum(dtype=torch.float64))
        self.tokens = self.p.shape[0]

    @torch.no_grad()
    def kl(self, model: nn.Module) -> float:
        """Σ over predicted tokens of KL(original ‖ ``model``) (divide by :attr:`tokens` for the mean)."""
        device = next(model.parameters()).device
        logits = model(input_ids=self.input_ids.to(device), use_cache=False).logits
        log_q = F.log_softmax(predicted(logits, self.labels).float(), -1)
        return self.neg_entropy - float((self.p.to(log_q.device) * log_q).sum(dtype=torch.float64))


def kl_sweep(model: nn.Module, chunks: Chunks, restored: dict[Any, Sequence[int]],
             step: Callable[[], None] = lambda: None) -> dict[Any, float]:
    """Mean over the predicted tokens of ``chunks`` of KL(original ‖ ``model``), with each named set of linearized
    layers in ``restored`` run as softmax (an empty set: the model as it is). ``step`` is called after every
    forward pass: per chunk, one of the original model and one per set."""
    modules = {i: softmax_module(model, i) for i in sorted({i for ids in restored.values() for i in ids})}
    totals, tokens = dict.fromkeys(restored, 0.0), 0
    for c in range(len(chunks)):
        target = _Original(model, *chunks[c])
        tokens += target.tokens
        step()
        for name, ids in restored.items():
            with softmax_restored(model, {i: modules[i] for i in ids}):
                totals[name] += target.kl(model)
            step()
    return {name: v / max(tokens, 1) for name, v in totals.items()}


def kl_to_original(model: nn.Module, chunks: Chunks, restored: Sequence[int] = ()) -> float:
    """Mean over predicted tokens of KL(original ‖ ``model``) with linearized layers ``restored`` run as softmax."""
    return kl_sweep(model, chunks, {"kl": restored})["kl"]


# ------------------------------------------------------------------------------------ criterion B
@torch.no_grad()
def output_error(model: nn.Module, chunks: Chunks, layer_ids: Sequence[int],
                 step: Callable[[], None] = lambda: None) -> dict[int, dict[str, float]]:
    """Per layer, teacher-forced on ``chunks`` (every layer restored, so each sees the original model's input):
    ``attention_mse`` (stage 1's per-head output MSE, before o_proj), ``output_sq_error`` (mean over tokens of
    ‖o_proj(y_lin) − o_proj(y_softmax)‖²), ``residual_power`` (mean ‖h_ℓ‖² of the residual entering the layer)
    and the criterion, ``output_error`` = output_sq_error / residual_power."""
    layers = find_decoder_layers(model)
    students = {i: layers[i].self_attn for i in layer_ids}
    sums = {i: torch.zeros(5, dtype=torch.float64) for i in layer_ids}  # Σe², elements, Σ‖o_e‖², Σ‖h‖², tokens
    seen: list[Tensor] = []  # o_proj inputs, teacher then student

    def record_input(module: nn.Module, args: tuple) -> None:
        seen.append(args[0])

    def compare(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        i = module.layer_idx
        y_soft = seen.pop()
        o_lin = students[i](*args, **{**kwargs, "past_key_values": None})[0]
        y_lin = seen.pop()
        e = (y_lin.double() - y_soft.double())
        o_e = o_lin.double() - output[0].double()
        sums[i][:3] += torch.tensor([float(e.square().sum()), e.numel(), float(o_e.square().sum())],
                                    dtype=torch.float64)

    def residual(module: nn.Module, args: tuple, kwargs: dict) -> None:
        h = (args[0] if args else kwargs["hidden_states"]).double()
        sums[module_index[id(module)]][3:] += torch.tensor([float(h.square().sum()), h.shape[0] * h.shape[1]],
                                                           dtype=torch.float64)

    module_index = {id(layers[i]): i for i in layer_ids}
    modules = {i: softmax_module(model, i) for i in layer_ids}
    handles = [students[i].o_proj.register_forward_pre_hook(record_input) for i in layer_ids]
    handles += [modules[i].register_forward_hook(compare, with_kwargs=True) for i in layer_ids]
    handles += [layers[i].register_forward_pre_hook(residual, with_kwargs=True) for i in layer_ids]
    device = next(model.parameters()).device
    try:
        with softmax_restored(model, modules):
            for c in range(len(chunks)):
                model(input_ids=chunks[c][0].to(device), use_cache=False, logits_to_keep=1)
                step()
    finally:
        for h in handles:
            h.remove()
    out = {}
    for i, (sq, n, oe, hh, t) in ((i, s.tolist()) for i, s in sums.items()):
        out[i] = {"attention_mse": sq / max(n, 1), "output_sq_error": oe / max(t, 1), "residual_power": hh / max(t, 1),
                  "output_error": oe / hh if hh > 0 else float("inf")}
    return out


# ------------------------------------------------------------------------------------ ranking and choice
def _order(scores: dict[int, float]) -> list[int]:
    """Layers by score, largest first (ties: lower index first)."""
    return sorted(scores, key=lambda i: (-scores[i], i))


def rank_layers(model: nn.Module, chunks: Chunks, n: int, criterion: str,
                progress: Any = None) -> dict[str, Any]:
    """Measure both criteria for every linearized layer of ``model`` (after stage 1) and choose the ``n`` layers
    ``criterion`` ranks first. Returns the record :func:`write_choice` stores (``chosen`` sorted)."""
    if criterion not in CRITERIA:
        raise ValueError(f"attention.softmax_criterion={criterion!r} is not valid; choose one of "
                         f"{', '.join(map(repr, CRITERIA))}")
    ids = linearized_ids(model)
    check_softmax_layers(n, len(ids), "linearized layers")
    done = 0

    def step() -> None:
        nonlocal done
        done += 1
        if progress is not None:
            progress.update(done)

    if progress is not None:  # output_error: 1 pass per chunk; KL: the original, the model, each layer, top n × 2
        progress.start("layer choice", len(chunks) * (len(ids) + 6), unit="pass")
    was_training = model.training
    model.eval()
    try:
        errors = output_error(model, chunks, ids, step)
        by_error = _order({i: errors[i]["output_error"] for i in ids})
        kl = kl_sweep(model, chunks, {"linearized": [], **{i: [i] for i in ids}, "output_error": by_error[:n]}, step)
        base = kl["linearized"]
        by_kl = _order({i: base - kl[i] for i in ids})
        if set(by_kl[:n]) == set(by_error[:n]):
            kl["kl_drop"] = kl["output_error"]
        else:  # the KL ranking is known only once every chunk is measured: a second sweep
            kl["kl_drop"] = kl_sweep(model, chunks, {"kl_drop": by_kl[:n]}, step)["kl_drop"]
    finally:
        model.train(was_training)
        if progress is not None:
            progress.end()
    ranking = {"kl_drop": by_kl, "output_error": by_error}
    return {
        "softmax_layers": n, "criterion": criterion, "chosen": sorted(ranking[criterion][:n]),
        "chunks": len(chunks), "tokens": int(chunks.input_ids.numel()),
        "kl_linearized": base, "kl_top_restored": {k: kl[k] for k in CRITERIA}, "ranking": ranking,
        "layers": [{"layer": i, "kl_restored": kl[i], "kl_drop": base - kl[i], **errors[i]} for i in ids],
    }


def write_choice(path: Path, record: dict[str, Any]) -> None:
    atomic_write_text(path, json.dumps(record, indent=1))


def read_choice(path: Path) -> dict[str, Any] | None:
    """The record :func:`rank_layers` made, or None when there is none; ValueError naming a damaged file."""
    if not path.exists():
        return None
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path} is damaged ({e}); delete it to measure the layer choice again") from None
    if not isinstance(record, dict) or not isinstance(record.get("chosen"), list):
        raise ValueError(f"{path} records no chosen layers; delete it to measure the layer choice again")
    return record
