"""Training at shifted positions (``data.max_position_offset``): the softmax teacher does not change, the
offsets are a pure function of the chunk, and stage 1 with them resumes bit-identically."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import build_tiny, tiny_recipe, write_recipe

from lolcats import AttentionConfig, convert_model
from lolcats.cli import main
from lolcats.positions import chunk_offset, shifted_positions

REPO = Path(__file__).resolve().parents[1]
ENTRY = REPO / "tests" / "fault_entry.py"


def test_softmax_is_the_same_at_any_offset_and_the_linear_term_is_not():
    """The reason to shift: rotary makes softmax attention depend on i − j only, but φ_q(q_i)·φ_k(k_j) on i and
    j themselves."""
    model = build_tiny("llama", max_position_embeddings=4096)
    x = torch.randint(0, 128, (2, 40), generator=torch.Generator().manual_seed(0))
    seen = []
    with torch.no_grad():
        plain = model(x, use_cache=False).logits
        with shifted_positions(model, 3000, seed=1):
            model.model.rotary_emb.register_forward_hook(lambda m, a, kw, out: seen.append(kw["position_ids"]),
                                                         with_kwargs=True)
            shifted = model(x, use_cache=False).logits
    offset = chunk_offset(x, 3000, 1)
    assert 0 < offset <= 3000 and torch.equal(seen[0][0], torch.arange(40) + offset)
    torch.testing.assert_close(shifted, plain, atol=1e-4, rtol=1e-4)
    convert_model(model, AttentionConfig(variant="sliding_window", window_size=8, feature_dim=8))
    with torch.no_grad():
        plain = model(x, use_cache=False).logits
        with shifted_positions(model, 3000, seed=1):
            shifted = model(x, use_cache=False).logits
        after = model(x, use_cache=False).logits
    assert (shifted - plain).abs().max() > 100 * (after - plain).abs().max() + 1e-4  # after: the hook is gone
    torch.testing.assert_close(after, plain)


def test_offsets_are_a_function_of_the_chunk_and_the_seed():
    a, b = torch.arange(32)[None], torch.arange(1, 33)[None]
    assert chunk_offset(a, 100, 0) == chunk_offset(a.clone(), 100, 0)
    assert len({chunk_offset(x, 10_000, s) for x in (a, b) for s in (0, 1)}) == 4
    assert chunk_offset(a, 0, 0) == 0


def test_stage1_with_offsets_trains_differently_and_resumes_bit_identically(tiny_run, tmp_path):
    """Shifted chunks give other weights than chunks at 0; a run killed after micro-step 5 and rerun ends
    bit-identical to an uninterrupted one (the offsets come from the chunks, not from a random state)."""
    _, root = tiny_run
    outs = {}
    for name, offset in (("plain", 0), ("shifted", 400), ("killed", 400)):
        recipe = tiny_recipe(root, out=tmp_path / name, **{"data.max_position_offset": offset, "lora.max_steps": 0,
                                                            "report.enabled": False})
        path = write_recipe(tmp_path / f"{name}.yaml", recipe)
        if name == "killed":
            killed = subprocess.run([sys.executable, str(ENTRY), "kill", "stage1:micro5", "--", "linearize", str(path)],
                                    capture_output=True, text=True, cwd=REPO)
            assert killed.returncode == -9, killed.stderr[-2000:]
        assert main(["linearize", str(path)]) == 0
        outs[name] = (tmp_path / name / "attention.safetensors").read_bytes()
    assert outs["plain"] != outs["shifted"] and outs["killed"] == outs["shifted"]


@pytest.mark.parametrize("offset,message", [(4096, "data.max_position_offset=4096 + data.seq_len=32 is past")])
def test_offset_past_the_position_limit_is_refused(tiny_run, tmp_path, capsys, offset, message):
    _, root = tiny_run
    path = write_recipe(tmp_path / "r.yaml", tiny_recipe(root, out=tmp_path / "o", **{"data.max_position_offset": offset}))
    assert main(["linearize", str(path)]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
