"""Where a model keeps its attention: decoder layers found by structure, and a cache laid out for them."""

from __future__ import annotations

from torch import nn
from transformers.cache_utils import DynamicCache, DynamicLayer

from lolcats.attention.cache import LolcatsCacheLayer
from lolcats.attention.hybrid import LolcatsAttention


def find_decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The model's decoder layers, found by structure: the largest ModuleList whose items own a ``self_attn``."""
    best: nn.ModuleList | None = None
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0 and all(
            hasattr(layer, "self_attn") for layer in module
        ):
            if best is None or len(module) > len(best):
                best = module
    if best is None:
        raise ValueError(f"{type(model).__name__} has no list of decoder layers with a `self_attn`; "
                         "it cannot be linearized")
    return best


class LolcatsCache(DynamicCache):
    """A ``DynamicCache`` whose linearized layers hold decode states (``model.generate`` also works with
    a plain ``DynamicCache``: linearized layers put their state in it on first use)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        for layer in find_decoder_layers(model):
            linear = isinstance(layer.self_attn, LolcatsAttention)
            self.layers.append(LolcatsCacheLayer() if linear else DynamicLayer())
