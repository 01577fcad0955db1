"""Tiny random models of every supported family, built locally (no hub), CPU, float32, seeded."""

from __future__ import annotations

import pytest
import torch
import transformers

COMMON = dict(
    vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=False,
)


def _llama():
    return transformers.LlamaConfig(**COMMON, rope_theta=10000.0)


def _mistral():
    return transformers.MistralConfig(**COMMON, sliding_window=None)


def _mixtral():
    return transformers.MixtralConfig(**COMMON, num_local_experts=4, num_experts_per_tok=2, sliding_window=None)


def _qwen2():
    return transformers.Qwen2Config(**COMMON)


def _qwen3():
    return transformers.Qwen3Config(**COMMON, head_dim=16)


def _gemma3():
    # head_dim != hidden / heads, own query_pre_attn_scalar, alternating local/global layers
    return transformers.Gemma3TextConfig(
        **{**COMMON, "num_hidden_layers": 3}, head_dim=24, query_pre_attn_scalar=20,
        sliding_window=512, layer_types=["sliding_attention", "sliding_attention", "full_attention"],
    )


def _phi3():
    return transformers.Phi3Config(**COMMON, pad_token_id=0, bos_token_id=1, eos_token_id=2, sliding_window=None)


def _phimoe():
    # Phi-3.5-MoE / GRIN-MoE: q/k/v/o and lm_head biases, LayerNorm, 4 experts (top-2), long-rope whose
    # original_max_position_embeddings is below the test lengths, so cos/sin carry long_mscale (q·k scaled by 1.69)
    half = COMMON["hidden_size"] // COMMON["num_attention_heads"] // 2
    rope = {"rope_type": "longrope", "rope_theta": 10000.0, "original_max_position_embeddings": 32,
            "short_factor": [1.0 + 0.1 * i for i in range(half)], "long_factor": [1.0 + 0.5 * i for i in range(half)],
            "short_mscale": 1.1, "long_mscale": 1.3}
    # initializer_range 0.05: at 0.02 the randomised o_proj/v biases swamp the token-dependent part of the
    # residual, and linearizing moves the logits hundreds of times less than in the other families (a weak test)
    return transformers.PhimoeConfig(**COMMON, num_local_experts=4, num_experts_per_tok=2, sliding_window=None,
                                     attention_bias=True, lm_head_bias=True, rope_parameters=rope,
                                     initializer_range=0.05)


FAMILY_CONFIGS = {
    "llama": (_llama, transformers.LlamaForCausalLM),
    "mistral": (_mistral, transformers.MistralForCausalLM),
    "mixtral": (_mixtral, transformers.MixtralForCausalLM),
    "qwen2": (_qwen2, transformers.Qwen2ForCausalLM),
    "qwen3": (_qwen3, transformers.Qwen3ForCausalLM),
    "gemma3": (_gemma3, transformers.Gemma3ForCausalLM),
    "phi3": (_phi3, transformers.Phi3ForCausalLM),
    "phimoe": (_phimoe, transformers.PhimoeForCausalLM),
}


def build_tiny(family: str, seed: int = 0, **overrides) -> transformers.PreTrainedModel:
    """A tiny random model of ``family`` in eval mode; biases and norms randomised so mistakes show."""
    make_config, cls = FAMILY_CONFIGS[family]
    config = make_config()
    for key, value in overrides.items():
        setattr(config, key, value)
    config._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    model = cls(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(0.2 * torch.randn_like(p))
    return model


@pytest.fixture(params=sorted(FAMILY_CONFIGS))
def family(request) -> str:
    return request.param


@pytest.fixture
def tiny_llama() -> transformers.PreTrainedModel:
    return build_tiny("llama")


# ------------------------------------------------------------------ a self-contained tiny run (no assets)
WORDS = ("the of and to in a is that for it as was with be by on not he this are or his from at which "
         "but have an they you were her she there all one been their has we would more when will no if out "
         "so said what up its about into than them can only other new some could time these two may then do "
         "first any my now such like our over man me even most made after also did many before must through").split()


def _text(seed: int, words: int) -> str:
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, len(WORDS), (words,), generator=g).tolist()
    return " ".join(WORDS[i] for i in idx) + "."


def make_tokenizer(folder, extra_words: str = ""):
    """A small word-level tokenizer saved in ``folder`` (built locally: no hub)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, ".": 3}
    for w in WORDS:
        vocab.setdefault(w, len(vocab))
    prompt_words = ("Below is an instruction that describes a task Write response appropriately completes the "
                    "request ### Instruction : Response Input , paired with input provides further context")
    for p in (prompt_words + " " + extra_words).split():
        vocab.setdefault(p, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   pad_token="</s>")
    fast.save_pretrained(folder)
    return fast


def make_tiny_model_folder(folder, seed: int = 0, family: str = "llama", extra_words: str = "", **overrides):
    tok = make_tokenizer(folder, extra_words)
    model = build_tiny(family, seed=seed, vocab_size=len(tok), eos_token_id=2, bos_token_id=1, pad_token_id=2,
                       **overrides)
    model.save_pretrained(folder)
    return folder


def make_corpus(folder, docs: int, words: int, seed: int = 0):
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(docs):
        (folder / f"{1900 + i}_doc.txt").write_text(_text(seed + i, words))
    return folder


def tiny_recipe(root, out=None, **changes) -> dict:
    """The tiny local recipe the tests share: the base in ``root/base``, training text in ``root/train``,
    out-of-domain text in ``root/ood``. ``changes`` are dotted keys, e.g. ``**{"distill.lr": 0.02}``."""
    recipe = {
        "out_dir": str(out or root / "out"), "seed": 0, "threads": 1,
        "model": {"name_or_path": str(root / "base"), "device": "cpu"},
        "attention": {"variant": "terraced", "window_size": 8, "feature_dim": 8},
        "data": {"train": str(root / "train"), "train_filter": "", "eval_in_domain": "heldout",
                 "eval_out_of_domain": str(root / "ood"), "seq_len": 32, "eval_seq_len": 32, "heldout_chunks": 2,
                 "eval_windows": 2},
        "distill": {"max_steps": 4, "grad_accum": 2, "eval_every": 2, "checkpoint_every": 1},
        "lora": {"max_steps": 3, "grad_accum": 2, "lr": 1e-3, "eval_every": 2, "checkpoint_every": 1},
        "report": {"sample_tokens": 4, "samples": ["the time"]},
    }
    for key, value in changes.items():
        node = recipe
        *parents, last = key.split(".")
        for part in parents:
            node = node[part]
        node[last] = value
    return recipe


def write_recipe(path, recipe: dict):
    import yaml

    path.write_text(yaml.safe_dump(recipe))
    return path


@pytest.fixture
def tiny_run(tmp_path):
    """A recipe over a local tiny Llama and local text; returns (recipe path, folder)."""
    make_tiny_model_folder(tmp_path / "base")
    make_corpus(tmp_path / "train", docs=12, words=200)
    make_corpus(tmp_path / "ood", docs=2, words=200, seed=100)
    return write_recipe(tmp_path / "recipe.yaml", tiny_recipe(tmp_path)), tmp_path
