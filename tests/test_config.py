from __future__ import annotations

import pytest

from lolcats.config import AttentionConfig, from_dict


def test_defaults_are_the_papers():
    c = AttentionConfig()
    assert (c.variant, c.window_size, c.feature_map, c.feature_dim) == ("terraced", 64, "hedgehog", 64)
    assert abs(c.window_factor_init + 2.197) < 1e-9


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"variant": "sliding"}, r"attention.variant='sliding' is not valid; choose one of 'sliding_window'"),
        ({"window_size": 0}, r"attention.window_size=0 must be a positive integer"),
        ({"feature_map": "relu"}, r"attention.feature_map='relu'.*'hedgehog'"),
        ({"feature_init": "zeros"}, r"attention.feature_init='zeros'.*'identity'"),
        ({"skip_layers": [-1]}, r"skip_layers contains -1"),
        ({"window_factor_init": float("nan")}, r"window_factor_init=nan must be finite"),
    ],
)
def test_bad_values_name_the_value_and_the_fix(kwargs, message):
    with pytest.raises(ValueError, match=message):
        AttentionConfig(**kwargs)


def test_from_dict_rejects_unknown_keys_listing_valid_ones():
    with pytest.raises(ValueError, match=r"unknown key 'windw_size' in attention; valid keys: .*window_size"):
        from_dict(AttentionConfig, {"windw_size": 3}, "attention")


def test_from_dict_type_checks():
    with pytest.raises(TypeError, match=r"attention.window_size='64' must be of type int"):
        from_dict(AttentionConfig, {"window_size": "64"}, "attention")
    c = from_dict(AttentionConfig, {"window_factor_init": -2, "skip_layers": [0, 3]}, "attention")
    assert c.window_factor_init == -2.0 and isinstance(c.window_factor_init, float)
    assert c.skip_layers == [0, 3]
