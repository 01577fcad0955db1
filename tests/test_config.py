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


def test_shipped_recipes_validate():
    import pathlib

    from lolcats.config import load_config

    recipes = sorted((pathlib.Path(__file__).parents[1] / "recipes").glob("*.yaml"))
    assert {r.stem for r in recipes} >= {"smollm2_135m", "smollm2_135m_full", "tiny_llama", "llama3_8b",
                                         "llama3_1_8b", "mistral_7b", "qwen2_5_7b"}
    for r in recipes:
        load_config(str(r))


def test_lora_targets_follow_the_family():
    from conftest import build_tiny

    from lolcats.config import LoraConfig
    from lolcats.finetune import lora_targets

    assert lora_targets(build_tiny("phi3"), LoraConfig()) == ["qkv_proj", "o_proj"]
    assert lora_targets(build_tiny("qwen2"), LoraConfig()) == ["q_proj", "k_proj", "v_proj", "o_proj"]
    assert lora_targets(build_tiny("qwen2"), LoraConfig(target_modules=["o_proj"])) == ["o_proj"]


LOOP_KEYS = {"max_steps", "epochs", "grad_accum", "lr", "weight_decay", "eval_every", "checkpoint_every", "max_grad_norm",
             "activation_checkpointing"}


def test_stage_sections_share_the_loop_settings_and_keep_their_recipe_keys():
    """``distill`` and ``lora`` are one LoopConfig each plus their own settings; their YAML keys and
    defaults are exactly these (recipes and recorded run configs depend on them)."""
    import dataclasses

    from lolcats.config import DistillConfig, LolcatsConfig, LoopConfig, LoraConfig

    def keys(cls: type) -> set[str]:
        return {f.name for f in dataclasses.fields(cls)}

    assert keys(LoopConfig) == LOOP_KEYS
    assert keys(DistillConfig) == LOOP_KEYS | {"mse_scale", "attention_ce_weight", "scheduler", "plateau_patience",
                                               "plateau_factor", "min_lr"}
    assert keys(LoraConfig) == LOOP_KEYS | {"r", "alpha", "dropout", "target_modules", "loss", "kl_temperature"}
    d, lo = DistillConfig(), LoraConfig()

    def loop(c: LoopConfig) -> tuple:
        return (c.max_steps, c.epochs, c.grad_accum, c.lr, c.weight_decay, c.eval_every, c.checkpoint_every,
                c.max_grad_norm, c.activation_checkpointing)

    assert loop(d) == (200, 0.0, 8, 1e-2, 0.0, 100, 10, 0.0, True)
    assert loop(lo) == (100, 0.0, 8, 1e-4, 0.0, 50, 10, 1.0, True)
    assert d.plateau() == {"patience": 10, "factor": 0.1, "min_lr": 1e-5}
    assert DistillConfig(scheduler="constant").plateau() is None and lo.plateau() is None
    assert LoraConfig(epochs=1.5, grad_accum=4).steps(10) == 4 and LoraConfig(max_steps=7).steps(10) == 7
    with pytest.raises(ValueError, match=r"^lora.grad_accum=0 must be a positive integer$"):
        LoraConfig(grad_accum=0)
    with pytest.raises(ValueError, match=r"^distill.lr=nan must be a finite number > 0"):
        DistillConfig(lr=float("nan"))
    with pytest.raises(ValueError, match=r"unknown key 'scheduler' in lora; valid keys: activation_checkpointing, alpha, "
                                         r"checkpoint_every, "):
        from_dict(LolcatsConfig, {"lora": {"scheduler": "plateau"}})
