"""Feature maps φ for the linear part of hybrid attention, registered by name.

Every map acts per head on (B, H, T, D) inputs and returns (B, H, T, F_out).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor, nn

EPS = 1e-12
FEATURE_MAPS: dict[str, type[FeatureMap]] = {}
INITS = ("kaiming", "identity")


def register_feature_map(name: str) -> Callable[[type[FeatureMap]], type[FeatureMap]]:
    def wrap(cls: type[FeatureMap]) -> type[FeatureMap]:
        FEATURE_MAPS[name] = cls
        cls.name = name
        return cls

    return wrap


def build_feature_map(name: str, num_heads: int, head_dim: int, feature_dim: int, init: str) -> FeatureMap:
    if name not in FEATURE_MAPS:
        raise ValueError(f"unknown feature map {name!r}; choose one of {', '.join(sorted(FEATURE_MAPS))}")
    if init not in INITS:
        raise ValueError(f"unknown feature-map init {init!r}; choose one of {', '.join(INITS)}")
    return FEATURE_MAPS[name](num_heads, head_dim, feature_dim, init)


def _init_weight(num_heads: int, head_dim: int, feature_dim: int, init: str) -> Tensor:
    """(H, D, F) projection: kaiming-uniform per head, or eye(D, F) for every head."""
    if init == "identity":
        return torch.eye(head_dim, feature_dim).expand(num_heads, -1, -1).clone()
    # kaiming_uniform_(a=√5) on each head's (F, D) weight, as nn.Linear would: U(±1/√D), drawn in one call
    bound = 1.0 / math.sqrt(head_dim)
    return torch.empty(num_heads, feature_dim, head_dim).uniform_(-bound, bound).transpose(1, 2).contiguous()


class FeatureMap(nn.Module):
    """Base class: ``forward`` maps (B, H, T, D) to (B, H, T, out_dim)."""

    name: str = ""
    out_dim: int

    def __init__(self, num_heads: int, head_dim: int, feature_dim: int, init: str) -> None:
        super().__init__()
        self.num_heads, self.head_dim, self.feature_dim = num_heads, head_dim, feature_dim


@register_feature_map("hedgehog")
class Hedgehog(FeatureMap):
    """φ(x) = [softmax(xW) ‖ softmax(−xW)], per head, no bias (Zhang et al. 2024, Hedgehog)."""

    def __init__(self, num_heads: int, head_dim: int, feature_dim: int, init: str) -> None:
        super().__init__(num_heads, head_dim, feature_dim, init)
        self.weight = nn.Parameter(_init_weight(num_heads, head_dim, feature_dim, init))
        self.out_dim = 2 * feature_dim

    def forward(self, x: Tensor) -> Tensor:
        z = x @ self.weight.to(x.dtype)  # (B, H, T, F)
        phi = torch.stack([z, -z], dim=-2).softmax(-1).flatten(-2)  # [softmax(xW) ‖ softmax(−xW)]
        if torch.is_grad_enabled() and phi.requires_grad:
            return phi.clamp(min=EPS)
        return phi.clamp_(min=EPS)  # prefill and decoding: no copy


@register_feature_map("hedgehog_untrained")
class UntrainedHedgehog(Hedgehog):
    """Hedgehog with its initial weights frozen: the untrained baseline."""

    def __init__(self, num_heads: int, head_dim: int, feature_dim: int, init: str) -> None:
        super().__init__(num_heads, head_dim, feature_dim, init)
        self.weight.requires_grad_(False)


@register_feature_map("t2r")
class T2R(FeatureMap):
    """φ(x) = relu(xW + b), per head (Kasai et al. 2021)."""

    def __init__(self, num_heads: int, head_dim: int, feature_dim: int, init: str) -> None:
        super().__init__(num_heads, head_dim, feature_dim, init)
        self.weight = nn.Parameter(_init_weight(num_heads, head_dim, feature_dim, init))
        self.bias = nn.Parameter(torch.zeros(num_heads, 1, feature_dim))
        self.out_dim = feature_dim

    def forward(self, x: Tensor) -> Tensor:
        z = torch.einsum("bhtd,hdf->bhtf", x, self.weight.to(x.dtype)) + self.bias.to(x.dtype)
        return torch.relu(z).clamp(min=EPS)


@register_feature_map("elu")
class Elu(FeatureMap):
    """φ(x) = elu(x) + 1, no parameters (Katharopoulos et al. 2020)."""

    def __init__(self, num_heads: int, head_dim: int, feature_dim: int, init: str) -> None:
        super().__init__(num_heads, head_dim, feature_dim, init)
        self.out_dim = head_dim

    def forward(self, x: Tensor) -> Tensor:
        return nn.functional.elu(x) + 1
