"""A linearized model with a sparse global cache: generation through its constant-size state equals full
forward passes (alone, left-padded, beside a softmax layer), its cache does not grow with context, and the
cache is an inference-time setting."""

from __future__ import annotations

import pytest
import torch
from conftest import build_tiny
from test_generate import generate_with_logits, left_padded, state_bytes_after

from lolcats import AttentionConfig, convert_model
from lolcats.attention import LolcatsCache, set_sparse_cache
from lolcats.ops.sparse import SparseState

OPTIONS = dict(window_size=8, feature_dim=8, chunk_size=8, sink_tokens=2, decay=True, decay_init=0.95,
               window_factor_init=0.0)


def tiny(variant: str = "terraced", size: int = 3, **kw):
    model = build_tiny("llama", **kw)
    convert_model(model, AttentionConfig(variant=variant, sparse_cache=size, **OPTIONS))
    return model


@pytest.mark.parametrize("variant", ["terraced", "sliding_window"])
def test_generated_step_logits_equal_full_forward(variant):
    """60 steps over many chunks: every step's logits equal a full forward pass's, and the decode state is a
    sparse-cache state."""
    model = tiny(variant)
    ids = torch.randint(0, 128, (1, 13), generator=torch.Generator().manual_seed(0))
    cache = LolcatsCache(model)
    with torch.no_grad():
        seq, step_logits = generate_with_logits(model, ids, 60, past_key_values=cache)
        full = model(seq, use_cache=False).logits
    torch.testing.assert_close(step_logits, full[:, 12:-1], atol=1e-4, rtol=1e-4)
    assert all(isinstance(layer.state, SparseState) for layer in cache.layers)
    assert int(cache.layers[0].state.cache_valid.sum()) == 3 * model.config.num_key_value_heads  # full


def test_left_padded_batch_equals_the_padded_forward():
    """Rows of different lengths, left-padded: decode equals the parallel pass over the same padded batch
    (evictions happen at the same token indices in both)."""
    model = tiny()
    g = torch.Generator().manual_seed(1)
    ids, mask = left_padded([torch.randint(1, 128, (n,), generator=g) for n in (5, 19)])
    width = ids.shape[1]
    with torch.no_grad():
        seq, step_logits = generate_with_logits(model, ids, 30, attention_mask=mask)
        full_mask = torch.cat([mask, torch.ones(2, 30, dtype=torch.long)], 1)[:, :-1]
        full = model(seq[:, :-1], attention_mask=full_mask, use_cache=False).logits
    torch.testing.assert_close(step_logits, full[:, width - 1 :], atol=1e-4, rtol=1e-4)


def test_beside_a_softmax_layer():
    """A mixed model (layer 0 softmax, layer 1 linear with a sparse cache) generates what its forward gives."""
    model = build_tiny("llama")
    convert_model(model, AttentionConfig(variant="terraced", sparse_cache=2, skip_layers=[0], **OPTIONS))
    ids = torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(2))
    cache = LolcatsCache(model)
    with torch.no_grad():
        seq, step_logits = generate_with_logits(model, ids, 40, past_key_values=cache)
        full = model(seq, use_cache=False).logits
    torch.testing.assert_close(step_logits, full[:, 9:-1], atol=1e-4, rtol=1e-4)
    assert isinstance(cache.layers[1].state, SparseState)


def test_cache_bytes_equal_at_l_and_4l():
    model = tiny(max_position_embeddings=4096)
    assert state_bytes_after(model, 256, LolcatsCache(model)) == state_bytes_after(model, 1024, LolcatsCache(model))


def test_set_sparse_cache_is_an_inference_setting():
    """Setting the cache changes the outputs past the window (the cache keeps keys the state would have
    summed); setting it back to 0 restores the plain model exactly; bad sizes are refused."""
    model = tiny(size=0)
    ids = torch.randint(0, 128, (1, 80), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        plain = model(ids).logits
        assert set_sparse_cache(model, 4) == 2
        sparse = model(ids).logits
        set_sparse_cache(model, 0)
        again = model(ids).logits
    torch.testing.assert_close(again, plain, atol=0, rtol=0)
    assert (sparse[:, 20:] - plain[:, 20:]).abs().max() > 1e-3
    torch.testing.assert_close(sparse[:, :8], plain[:, :8], atol=1e-5, rtol=1e-5)  # the first window: the same
    for bad in (-1, 257, 2.5, True):
        with pytest.raises(ValueError, match="sparse cache size"):
            set_sparse_cache(model, bad)


def test_cli_sparse_cache_and_softmax_layers_flags(tiny_run, tmp_path, capsys):
    """`--sparse-cache G` scores a linearized out_dir with the cache (a different perplexity from without), and
    is refused for a softmax model and above 256, naming the value."""
    from lolcats.cli import main
    from lolcats.config import load_config
    from lolcats.pipeline import linearize

    recipe, root = tiny_run
    linearize(load_config(str(recipe)))
    out, data = str(root / "out"), str(root / "ood")

    def ppl(*extra: str) -> str:
        assert main(["eval", "ppl", out, "--data", data, "--seq-len", "300", "--windows", "1", *extra]) == 0
        return capsys.readouterr().out.splitlines()[0]

    plain, cached = ppl(), ppl("--sparse-cache", "2")
    assert plain.startswith("perplexity ") and cached.startswith("perplexity ") and plain != cached
    assert main(["eval", "ppl", out, "--data", data, "--sparse-cache", "300"]) == 2
    assert "--sparse-cache 300" in capsys.readouterr().err
    base = str(root / "base")
    assert main(["eval", "ppl", base, "--data", data, "--seq-len", "300", "--windows", "1", "--sparse-cache", "2"]) == 2
    assert "has none" in capsys.readouterr().err
    # --softmax-layers runs chosen linearized layers as softmax (another perplexity each), alone or with the
    # cache; a layer that is not linearized is named
    some, both, every = ppl("--softmax-layers", "0"), ppl("--softmax-layers", "1", "--sparse-cache", "2"), ppl(
        "--softmax-layers", "0", "1")
    assert len({plain, cached, some, both, every}) == 5
    assert main(["eval", "ppl", out, "--data", data, "--softmax-layers", "0", "7"]) == 2
    assert "--softmax-layers 7" in capsys.readouterr().err


def test_a_sparse_cache_added_after_training(tiny_run):
    """``attention.sparse_cache_training: false`` trains exactly the weights of no cache, gives the finished model
    (and the loaded out_dir) the cache, measures it with the cache, and lets a finished run change G and resume
    without training again; training with the cache in place is another config."""
    import json

    from safetensors.torch import load_file

    from lolcats.attention import LolcatsAttention
    from lolcats.checkpoint import CheckpointError, load
    from lolcats.config import load_config
    from lolcats.pipeline import linearize

    recipe, root = tiny_run
    common = ["attention.chunk_size=8", "data.eval_seq_len=96"]

    def run(out: str, *extra: str):
        return linearize(load_config(str(recipe), [f"out_dir={root / out}", *common, *extra]))

    run("plain")
    run("late", "attention.sparse_cache=2", "attention.sparse_cache_training=false")
    plain, late = root / "plain", root / "late"
    for name in ("attention.safetensors", "adapter/adapter_model.safetensors"):
        a, b = load_file(str(plain / name)), load_file(str(late / name))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    record = json.loads((late / "lolcats_config.json").read_text())
    assert record["format_version"] == 5
    assert (record["config"]["attention"]["sparse_cache"], record["config"]["attention"]["sparse_cache_training"]) == (2, False)
    evals = {o: json.loads((root / o / "lolcats_config.json").read_text())["evals"] for o in ("plain", "late")}
    assert evals["late"]["stage1"] == evals["plain"]["stage1"]  # stage 1 is measured as trained
    assert evals["late"]["stage2"] != evals["plain"]["stage2"]  # the finished model has the cache
    assert "a sparse cache of 2 pairs per key/value head added after training" in (late / "report.md").read_text()
    layers = [m for m in load(late).modules() if isinstance(m, LolcatsAttention)]
    assert layers and all(m.spec.sparse == 2 for m in layers)
    # another G after training: the run resumes (nothing trained again), records and measures the new G
    trained = (late / "metrics.jsonl").read_text().count('"stage": "stage')
    run("late", "attention.sparse_cache=3", "attention.sparse_cache_training=false")
    again = json.loads((late / "lolcats_config.json").read_text())
    assert (late / "metrics.jsonl").read_text().count('"stage": "stage') == trained
    assert again["config"]["attention"]["sparse_cache"] == 3 and again["evals"]["stage2"] != evals["late"]["stage2"]
    assert all(m.spec.sparse == 3 for m in load(late).modules() if isinstance(m, LolcatsAttention))
    with pytest.raises(CheckpointError, match=r"another config \(differs in attention.sparse_cache\)"):
        run("late", "attention.sparse_cache=3")  # in training: other weights
