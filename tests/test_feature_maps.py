from __future__ import annotations

import pytest
import torch

from lolcats.feature_maps import FEATURE_MAPS, build_feature_map


def x(h: int = 3, d: int = 8) -> torch.Tensor:
    return torch.randn(2, h, 5, d, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("name,out_dim", [("hedgehog", 12), ("hedgehog_untrained", 12), ("t2r", 6), ("elu", 8)])
def test_shapes_and_positivity(name, out_dim):
    fmap = build_feature_map(name, 3, 8, 6, "kaiming")
    y = fmap(x())
    assert y.shape == (2, 3, 5, out_dim) == (2, 3, 5, fmap.out_dim)
    assert (y > 0).all(), "features must be positive so the normaliser stays positive"


def test_hedgehog_halves_are_softmaxes_of_plus_and_minus_projection():
    fmap = build_feature_map("hedgehog", 3, 8, 6, "kaiming")
    inp = x()
    z = torch.einsum("bhtd,hdf->bhtf", inp, fmap.weight)
    y = fmap(inp)
    torch.testing.assert_close(y[..., :6], z.softmax(-1))
    torch.testing.assert_close(y[..., 6:], (-z).softmax(-1))
    assert not torch.equal(fmap.weight[0], fmap.weight[1]), "per-head weights are initialised independently"


def test_identity_init_is_eye():
    fmap = build_feature_map("hedgehog", 3, 8, 8, "identity")
    inp = x()
    torch.testing.assert_close(fmap(inp)[..., :8], inp.softmax(-1))


def test_untrained_hedgehog_is_frozen_and_trained_one_is_not():
    assert not any(p.requires_grad for p in build_feature_map("hedgehog_untrained", 3, 8, 6, "kaiming").parameters())
    assert all(p.requires_grad for p in build_feature_map("hedgehog", 3, 8, 6, "kaiming").parameters())


def test_registry_errors_name_the_choices():
    assert {"hedgehog", "hedgehog_untrained", "t2r", "elu"} <= set(FEATURE_MAPS)
    with pytest.raises(ValueError, match="unknown feature map 'cosformer'.*hedgehog"):
        build_feature_map("cosformer", 3, 8, 6, "kaiming")
    with pytest.raises(ValueError, match="unknown feature-map init 'zeros'.*identity"):
        build_feature_map("hedgehog", 3, 8, 6, "zeros")
