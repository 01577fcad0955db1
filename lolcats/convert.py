"""Model surgery: replace each decoder layer's ``self_attn`` with :class:`LolcatsAttention`."""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
from torch import nn

from lolcats.attention import LolcatsAttention, find_decoder_layers
from lolcats.config import AttentionConfig
from lolcats.models import Family, family_for

logger = logging.getLogger(__name__)

TRAINABLE_KEYS = ("feature_map_q", "feature_map_k", "window_factor", "decay_logit")


def _head_counts(model: nn.Module) -> tuple[int, int]:
    cfg = model.config
    heads = cfg.num_attention_heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    if heads % kv_heads:
        raise ValueError(f"num_attention_heads={heads} is not a multiple of num_key_value_heads={kv_heads}")
    return heads, kv_heads


def _plan(model: nn.Module, family: Family, layers: nn.ModuleList, config: AttentionConfig) -> list[int]:
    """Indices of layers to convert; every check happens here, before anything is changed."""
    n = len(layers)
    bad = [i for i in config.skip_layers if i >= n]
    if bad:
        raise ValueError(f"attention.skip_layers has index {bad[0]} but the model has {n} layers (0..{n - 1})")
    todo = []
    for i, layer in enumerate(layers):
        attn = layer.self_attn
        if isinstance(attn, LolcatsAttention):
            raise ValueError(f"layer {i} is already linearized; convert the original model instead")
        missing = [name for name in family.child_names() if not hasattr(attn, name)]
        if missing:
            raise ValueError(f"layer {i}: {type(attn).__name__} has no {missing[0]!r}; the {family.name} "
                             "adapter does not fit this model")
        if getattr(attn, "attn_logit_softcapping", None) is not None:
            raise ValueError(f"layer {i}: attention logit soft-capping is not supported "
                             f"(attn_logit_softcapping={attn.attn_logit_softcapping})")
        if i in config.skip_layers:
            continue
        if config.keep_native_window and family.native_window(attn) is not None:
            continue
        todo.append(i)
    return todo


def convert_model(model: nn.Module, config: AttentionConfig | None = None, seed: int | None = None) -> nn.Module:
    """Linearize a Hugging Face causal LM in place and return it.

    Every base weight is frozen; only the feature maps and window factors of converted layers train.
    The model is either fully converted or left untouched (all checks run first).

    Args:
        model: e.g. ``LlamaForCausalLM``; see :func:`lolcats.models.supported_model_types`.
        config: attention settings; defaults to :class:`AttentionConfig` ().
        seed: when given, layer ``i``'s feature maps are drawn from a generator seeded by
            ``(seed, i)`` alone, so converting any subset of layers (block-by-block training) gives
            each layer the same initial weights as converting the whole model; when None they draw
            from the global RNG in layer order.

    Returns:
        The same model object.
    """
    config = config or AttentionConfig()
    family = family_for(model)
    layers = find_decoder_layers(model)
    heads, kv_heads = _head_counts(model)
    todo = _plan(model, family, layers, config)

    for p in model.parameters():
        p.requires_grad_(False)
    for i in todo:
        base = layers[i].self_attn
        with torch.random.fork_rng(devices=[], enabled=seed is not None):
            if seed is not None:
                torch.manual_seed(seed * 1_000_003 + i)
            new = LolcatsAttention(base, family, config, i, heads, kv_heads)
        new.train(base.training)
        layers[i].self_attn = new
    logger.info("linearized %d of %d layers (%s, %s variant, window %d)", len(todo), len(layers),
                family.name, config.variant, config.window_size)
    return model


def linearized_layers(model: nn.Module) -> list[LolcatsAttention]:
    return [m for m in model.modules() if isinstance(m, LolcatsAttention)]


def trainable_attention_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """Feature-map and window-factor parameters by name (frozen ones, e.g. untrained maps, excluded)."""
    return {
        name: p for name, p in model.named_parameters()
        if p.requires_grad and any(f".{key}" in name for key in TRAINABLE_KEYS)
    }


def replace_linearized(model: nn.Module, make: Callable[[LolcatsAttention], nn.Module]) -> list[nn.Module]:
    """Put ``make(attn)`` in place of every linearized ``self_attn`` (e.g. stage-1 transfer wrappers)."""
    new = []
    for layer in find_decoder_layers(model):
        if isinstance(layer.self_attn, LolcatsAttention):
            layer.self_attn = make(layer.self_attn)
            new.append(layer.self_attn)
    return new


def restore_linearized(model: nn.Module) -> None:
    """Undo :func:`replace_linearized`: wrappers expose the wrapped module as ``.student``."""
    for layer in find_decoder_layers(model):
        student = getattr(layer.self_attn, "student", None)
        if isinstance(student, LolcatsAttention):
            layer.self_attn = student
