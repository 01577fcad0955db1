"""Few-shot MMLU: data loaders and their errors, the prompt, and cached+batched == uncached scoring."""

from __future__ import annotations

import copy
import json
import random

import pytest
import torch

from lolcats import AttentionConfig, convert_model
from lolcats.cli import main
from lolcats.eval.mmlu import build_prompt, evaluate_mmlu, letter_token_ids, tokenize_subject
from lolcats.eval.mmlu_data import load_jsonl, load_mmlu
from tests.conftest import WORDS, build_tiny, make_tiny_model_folder, make_tokenizer

MMLU_WORDS = "The following are multiple choice questions with answers Answer A B C D : ( ) ?"


def _item(rng: random.Random, subject: str) -> dict:
    words = lambda n: " ".join(rng.choice(WORDS) for _ in range(n))  # noqa: E731
    return {"question": words(rng.randint(3, 25)) + " ?", "answer_a": words(rng.randint(1, 4)),
            "answer_b": words(rng.randint(1, 4)), "answer_c": words(rng.randint(1, 4)),
            "answer_d": words(rng.randint(1, 4)), "correct_answer": rng.choice("ABCD"), "topic": subject}


def write_jsonl(path, subjects=("first topic", "second topic", "third topic"), per_subject=11, seed=0):
    rng = random.Random(seed)
    rows = [_item(rng, s) for s in subjects for _ in range(per_subject)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return make_tokenizer(tmp_path_factory.mktemp("tok"), MMLU_WORDS)


def test_prompt_is_the_standard_format():
    data_rows = [{"question": f" q{i} ", "answer_a": "w", "answer_b": "x", "answer_c": "y", "answer_d": "z",
                  "correct_answer": "ABCD"[i % 4], "topic": "high school physics"} for i in range(7)]
    from lolcats.eval.mmlu_data import _item_from_row

    items = [_item_from_row(r, "x") for r in data_rows]
    text = build_prompt("high school physics", items[:2], items[5])
    assert text == ("The following are multiple choice questions (with answers) about high school physics.\n\n"
                    "q0\nA. w\nB. x\nC. y\nD. z\nAnswer: A\n\n"
                    "q1\nA. w\nB. x\nC. y\nD. z\nAnswer: B\n\n"
                    "q5\nA. w\nB. x\nC. y\nD. z\nAnswer:")


def test_first_five_rule_and_selection(tmp_path):
    data = load_jsonl(write_jsonl(tmp_path / "m.jsonl"))
    assert data.subjects == ["first topic", "second topic", "third topic"]
    assert all(len(v) == 5 for v in data.dev.values()) and all(len(v) == 6 for v in data.test.values())
    assert "first 5 test items" in data.exemplar_rule and data.sha256
    sub = data.select(["second_topic"], limit=2)
    assert sub.subjects == ["second topic"] and len(sub.test["second topic"]) == 2
    with pytest.raises(ValueError, match="unknown MMLU subject.*nope"):
        data.select(["nope"])


def _scores(result):
    return torch.tensor([p["logprobs"] for p in result["predictions"]]), [p["prediction"] for p in result["predictions"]]


@pytest.mark.parametrize("kind", ["softmax", "sliding_window", "terraced", "linear", "terraced+sinks+decay",
                                  "linear+sinks+decay", "terraced+sinks+decay+sparse"])
@pytest.mark.parametrize("shots", [5, 0])
def test_cached_batched_equals_uncached(tmp_path, tokenizer, kind, shots):
    """The subject prefix run once and read by every batch (KV cache in place, recurrent state shared),
    questions batched with right padding, gives the same predictions and log-probabilities (within 1e-4) as every prompt
    run alone from scratch — the cached batches running the last layer's MLP on each row's last token only.
    Windows of 8 tokens make the ~150-token prompts cross many windows."""
    data = load_jsonl(write_jsonl(tmp_path / "m.jsonl"))
    torch.manual_seed(0)
    model = build_tiny("llama", vocab_size=len(tokenizer))
    if kind != "softmax":
        options = {"sink_tokens": 3, "decay": True, "decay_init": 0.95} if "+sinks+decay" in kind else {}
        options.update({"sparse_cache": 3} if "+sparse" in kind else {})
        convert_model(model, AttentionConfig(variant=kind.split("+")[0], window_size=8, chunk_size=8,
                                             window_factor_init=0.0, **options))
    seen = []  # token counts the last layer's MLP ran on
    model.model.layers[-1].mlp.register_forward_hook(lambda module, args, out: seen.append(args[0].shape[1]))
    fast = evaluate_mmlu(model, tokenizer, data, shots=shots, batch_size=4, cached=True)
    batches, seen = seen.count(1), []
    slow = evaluate_mmlu(model, tokenizer, data, shots=shots, batch_size=1, cached=False)
    assert batches == 6 and 1 not in seen  # cached batches run it on each row's last token only
    lp_fast, pred_fast = _scores(fast)
    lp_slow, pred_slow = _scores(slow)
    assert pred_fast == pred_slow
    torch.testing.assert_close(lp_fast, lp_slow, atol=1e-4, rtol=0)
    assert fast["items"] == 18 and fast["tokens_run"] < slow["tokens_run"]
    # the scores are real log-probabilities that differ between letters
    assert (lp_fast < 0).all() and lp_fast.std(-1).min() > 0


def test_chunked_fallback_and_head_without_output_embeddings(tmp_path, tokenizer, monkeypatch):
    """Questions too long for the dense read of the shared prefix state take the chunked form, and a model
    without an output-embedding module keeps its logits by position: both still equal the uncached path."""
    import lolcats.eval.shared_prefix as shared_prefix

    data = load_jsonl(write_jsonl(tmp_path / "m.jsonl"))
    torch.manual_seed(0)
    model = build_tiny("llama", vocab_size=len(tokenizer))
    convert_model(model, AttentionConfig(variant="terraced", window_size=8, chunk_size=8))
    slow = evaluate_mmlu(model, tokenizer, data, batch_size=1, cached=False)
    calls = []
    dense = shared_prefix.attend_on_state
    monkeypatch.setattr(shared_prefix, "attend_on_state", lambda *a, **k: calls.append(1) or dense(*a, **k))
    monkeypatch.setattr(shared_prefix, "DENSE_MAX_TOKENS", 0)
    monkeypatch.setattr(model, "get_output_embeddings", lambda: None)
    fast = evaluate_mmlu(model, tokenizer, data, batch_size=4, cached=True)
    assert not calls  # every batch went through the chunked attend_after
    assert _scores(fast)[1] == _scores(slow)[1]
    torch.testing.assert_close(_scores(fast)[0], _scores(slow)[0], atol=1e-4, rtol=0)


def test_shared_prefix_is_a_token_prefix_of_every_prompt(tmp_path, tokenizer):
    data = load_jsonl(write_jsonl(tmp_path / "m.jsonl"))
    s = data.subjects[0]
    prompts = tokenize_subject(tokenizer, s, data.dev[s], data.test[s])
    assert len(prompts.shared) > 50
    for item, rest in zip(data.test[s], prompts.rests, strict=True):
        whole = tokenizer(build_prompt(s, data.dev[s], item), add_special_tokens=False).input_ids
        assert prompts.shared + rest == whole and len(rest) >= 1


def write_stem_jsonl(path, seed=0):
    """Two subjects whose questions start alike: one where groups of 2-4 questions read the same 40-word
    passage (MMLU's history subjects), one with a 36-word stem every question begins with (moral
    scenarios), and a few questions of their own in each."""
    rng = random.Random(seed)
    words = lambda n: " ".join(rng.choice(WORDS) for _ in range(n))  # noqa: E731
    rows = []
    for subject, passages in (("passage topic", [words(40) for _ in range(4)]), ("stem topic", [words(36)])):
        for _ in range(17):
            row = _item(rng, subject)
            if rng.random() < 0.8:
                row["question"] = rng.choice(passages) + " " + row["question"]
            rows.append(row)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_stem_groups_share_exact_token_prefixes(tmp_path, tokenizer):
    from lolcats.eval.mmlu import stem_groups, tokens_run

    data = load_jsonl(write_stem_jsonl(tmp_path / "m.jsonl"))
    for s in data.subjects:
        prompts = tokenize_subject(tokenizer, s, data.dev[s], data.test[s])
        groups = stem_groups(prompts.rests, min_stem=32)
        assert sorted(i for _, idx in groups for i in idx) == list(range(len(prompts.rests)))  # each once
        stems = [(stem, idx) for stem, idx in groups if stem]
        assert stems and sum(1 for stem, _ in groups if not stem) <= 1
        for stem, idx in stems:
            assert stem >= 32 and len(idx) >= 2
            assert all(prompts.rests[i][:stem] == prompts.rests[idx[0]][:stem] for i in idx)
            assert all(len(prompts.rests[i]) > stem for i in idx)  # each question keeps a token of its own
            assert len({prompts.rests[i][stem] for i in idx}) > 1  # the whole shared start, not less
        assert tokens_run(prompts) < tokens_run(prompts, cached=False)
        assert tokens_run(prompts) == len(prompts.shared) + sum(len(r) for r in prompts.rests) - sum(
            stem * (len(idx) - 1) for stem, idx in stems)
    # nothing shared that far: every question alone
    assert stem_groups([[1, 2, 3], [1, 2, 4], [5]], min_stem=32) == [(0, [0, 1, 2])]
    assert stem_groups([[1, 2, 3], [1, 2, 4], [5]], min_stem=2) == [(2, [0, 1]), (0, [2])]


def test_batch_plan_runs_each_question_once_shortest_first():
    from lolcats.eval.mmlu import batch_plan, stem_groups

    rests = [[1, 2, 3, 9, 9], [1, 2, 4], [5, 6], [7], [1, 2, 3, 8], [6, 6, 6]]
    plan = batch_plan(rests, batch_size=2, min_stem=2)
    assert plan == [(2, [[1, 4], [0]]), (0, [[3, 2], [5]])]
    for (stem, batches), (stem_g, group) in zip(plan, stem_groups(rests, min_stem=2), strict=True):
        flat = [i for batch in batches for i in batch]
        assert stem == stem_g and sorted(flat) == sorted(group) and all(len(b) <= 2 for b in batches)
        assert [len(rests[i]) for i in flat] == sorted(len(rests[i]) for i in group)


@pytest.mark.parametrize("kind", ["softmax", "terraced", "linear", "skip_first"])
def test_questions_with_a_shared_stem_equal_uncached(tmp_path, tokenizer, kind):
    """Questions that share a passage or a stem run it once on top of the exemplars, then read it like the
    exemplars: still the uncached path's predictions and log-probabilities (within 1e-4)."""
    data = load_jsonl(write_stem_jsonl(tmp_path / "m.jsonl"))
    torch.manual_seed(0)
    model = build_tiny("llama", vocab_size=len(tokenizer))
    if kind != "softmax":
        convert_model(model, AttentionConfig(variant="linear" if kind == "linear" else "terraced", window_size=8,
                                             chunk_size=8, skip_layers=[0] if kind == "skip_first" else []))
    fast = evaluate_mmlu(model, tokenizer, data, batch_size=3, cached=True)
    slow = evaluate_mmlu(model, tokenizer, data, batch_size=1, cached=False)
    assert _scores(fast)[1] == _scores(slow)[1]
    torch.testing.assert_close(_scores(fast)[0], _scores(slow)[0], atol=1e-4, rtol=0)
    prompts = [tokenize_subject(tokenizer, s, data.dev[s], data.test[s]) for s in data.subjects]
    flat = sum(len(p.shared) + sum(len(r) for r in p.rests) for p in prompts)  # exemplars shared, stems not
    assert fast["tokens_run"] < flat - 200  # the stems did run once per group


def test_letter_ids_and_ties_go_to_the_earliest_letter(tmp_path):
    tok = make_tokenizer(tmp_path)  # no "A".."D" in its vocabulary: they are all <unk>
    ids = letter_token_ids(make_tokenizer(tmp_path / "x", MMLU_WORDS))
    assert len(set(ids)) == 4
    assert len(set(letter_token_ids(tok))) == 1  # single tokens, but all the same: caught by the tie rule only
    # ties go to the earliest letter
    data = load_jsonl(write_jsonl(tmp_path / "m.jsonl", per_subject=6))
    model = build_tiny("llama", vocab_size=len(tok))
    result = evaluate_mmlu(model, tok, data, shots=1)
    assert {p["prediction"] for p in result["predictions"]} == {"A"}


# ------------------------------------------------------------------------------------------ errors

@pytest.mark.parametrize("edit,message", [
    (lambda r: r.pop("answer_c"), "line 4: missing field 'answer_c'"),
    (lambda r: r.update(correct_answer="E"), "line 4: answer 'E' is not one of A, B, C, D"),
    (lambda r: r.update(topic="  "), "line 4: empty subject"),
    (lambda r: r.pop("question"), "line 4: missing field 'question'"),
])
def test_malformed_jsonl_names_file_line_and_field(tmp_path, edit, message):
    path = write_jsonl(tmp_path / "m.jsonl")
    lines = path.read_text().splitlines()
    row = json.loads(lines[3])
    edit(row)
    lines[3] = json.dumps(row)
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError) as e:
        load_mmlu(str(path))
    assert str(path) in str(e.value) and message in str(e.value)


def test_subject_too_small_for_exemplars(tmp_path):
    path = write_jsonl(tmp_path / "m.jsonl", per_subject=5)
    with pytest.raises(ValueError, match="subject 'first topic' has 5 items.*at least 6"):
        load_mmlu(str(path))


def _write_csv(folder, subject, split, rows):
    import csv

    (folder / split).mkdir(parents=True, exist_ok=True)
    with open(folder / split / f"{subject}_{split}.csv", "w", newline="") as f:
        csv.writer(f).writerows(rows)


def test_hendrycks_folder_uses_its_dev_split(tmp_path):
    rows = [[f"question {i}", "a", "b", "c", "d", "ABCD"[i % 4]] for i in range(7)]
    _write_csv(tmp_path, "college_biology", "dev", rows[:5])
    _write_csv(tmp_path, "college_biology", "test", rows)
    data = load_mmlu(str(tmp_path))
    assert data.subjects == ["college biology"] and len(data.test["college biology"]) == 7
    assert "dev split" in data.exemplar_rule
    _write_csv(tmp_path, "college_biology", "test", [*rows, ["q", "a", "b", "c", "d", "F"]])
    with pytest.raises(ValueError, match=r"college_biology_test.csv, line 8: answer 'F'"):
        load_mmlu(str(tmp_path))
    _write_csv(tmp_path, "college_biology", "test", [*rows, ["q", "a", "b", "c", "d"]])
    with pytest.raises(ValueError, match=r"college_biology_test.csv, line 8: .*missing field answer"):
        load_mmlu(str(tmp_path))
    _write_csv(tmp_path, "college_biology", "test", [])
    with pytest.raises(ValueError, match=r"empty subject 'college biology'"):
        load_mmlu(str(tmp_path))


def test_hf_style_jsonl(tmp_path):
    rows = [{"question": f"q {i}", "choices": ["w", "x", "y", "z"], "answer": i % 4, "subject": "world_religions"}
            for i in range(8)]
    path = tmp_path / "hf.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    data = load_mmlu(str(path))
    assert data.subjects == ["world religions"] and [x.answer for x in data.test["world religions"]] == [1, 2, 3]


def test_missing_data_path():
    with pytest.raises(FileNotFoundError, match="not found|does not exist"):
        load_mmlu("/no/such/mmlu.jsonl")


# --------------------------------------------------------------------------------------------- CLI

def test_cli_eval_mmlu_writes_json(tmp_path, capsys):
    folder = make_tiny_model_folder(tmp_path / "model", extra_words=MMLU_WORDS)
    data = write_jsonl(tmp_path / "m.jsonl")
    out = tmp_path / "res.json"
    rc = main(["eval", "mmlu", str(folder), "--data", str(data), "--limit", "3", "--subjects", "first topic",
               "third_topic", "--shots", "2", "--batch-size", "2", "--out", str(out)])
    assert rc == 0
    result = json.loads(out.read_text())
    assert result["items"] == 6 and sorted(result["subjects"]) == ["first topic", "third topic"]
    assert result["shots"] == 2 and result["data"]["source"] == str(data) and result["model"] == str(folder)
    assert 0 <= result["micro_accuracy"] <= 1 and len(result["predictions"]) == 6
    printed = capsys.readouterr().out
    assert "micro average" in printed and str(out) in printed


def test_cli_eval_mmlu_bad_input(tmp_path, capsys):
    folder = make_tiny_model_folder(tmp_path / "model", extra_words=MMLU_WORDS)
    data = write_jsonl(tmp_path / "m.jsonl")
    assert main(["eval", "mmlu", str(folder), "--data", str(data), "--shots", "7"]) == 2
    assert "--shots must be between 0 and 5, got 7" in capsys.readouterr().err
    assert main(["eval", "mmlu", str(tmp_path / "nope"), "--data", str(data)]) == 2
    assert "error:" in capsys.readouterr().err


def test_linearized_cache_copy_is_independent(tokenizer):
    """Copying a prefix cache and extending the copy leaves the original state untouched."""
    torch.manual_seed(0)
    model = build_tiny("llama", vocab_size=len(tokenizer))
    convert_model(model, AttentionConfig(variant="terraced", window_size=8, chunk_size=8))
    from transformers import DynamicCache

    ids = torch.randint(3, len(tokenizer), (1, 40))
    cache = DynamicCache()
    with torch.no_grad():
        model(ids[:, :30], past_key_values=cache, use_cache=True)
        before = [t.clone() for t in cache.layers[0].state.tensors()]
        other = copy.deepcopy(cache)
        other.batch_repeat_interleave(3)
        model(ids[:, 30:].repeat(3, 1), past_key_values=other, use_cache=True)
    for a, b in zip(before, cache.layers[0].state.tensors(), strict=True):
        assert torch.equal(a, b)
    assert cache.layers[0].state.num_tokens == 30 and other.layers[0].state.num_tokens == 40


def test_hf_source_reads_test_and_dev_splits(monkeypatch):
    """`hf:cais/mmlu` goes through datasets.load_dataset (the hub is not reachable here, so the call is
    answered locally with the same columns cais/mmlu has: question, subject, choices, answer)."""
    datasets = pytest.importorskip("datasets", reason="installed with the `eval` extra")

    def rows(n, offset):
        return [{"question": f"q{offset + i}", "subject": "college_physics", "choices": ["a", "b", "c", "d"],
                 "answer": (offset + i) % 4} for i in range(n)]

    calls = []

    def fake_load(name, config):
        calls.append((name, config))
        return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows(7, 0)),
                                     "dev": datasets.Dataset.from_list(rows(5, 100))})

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    data = load_mmlu("hf:cais/mmlu")
    assert calls == [("cais/mmlu", "all")]
    assert data.source == "hf:cais/mmlu" and "dev split" in data.exemplar_rule
    assert len(data.test["college physics"]) == 7 and [x.question for x in data.dev["college physics"]][0] == "q100"
    assert data.test["college physics"][6].answer == 2


def test_bfloat16_base_keeps_trainable_weights_in_float32(tokenizer, tmp_path):
    from lolcats.base_model import cast_base

    torch.manual_seed(0)
    model = build_tiny("llama", vocab_size=len(tokenizer))
    convert_model(model, AttentionConfig(variant="terraced", window_size=8, chunk_size=8))
    cast_base(model, "bfloat16")
    dtypes = {n: p.dtype for n, p in model.named_parameters()}
    assert all(d == torch.float32 for n, d in dtypes.items() if "feature_map" in n or "window_factor" in n)
    assert dtypes["model.layers.0.mlp.up_proj.weight"] == torch.bfloat16
    data = load_jsonl(write_jsonl(tmp_path / "m.jsonl"))
    fast = evaluate_mmlu(model, tokenizer, data, batch_size=4)
    slow = evaluate_mmlu(model, tokenizer, data, batch_size=1, cached=False)
    lp_fast, _ = _scores(fast)
    lp_slow, _ = _scores(slow)
    torch.testing.assert_close(lp_fast, lp_slow, atol=0.05, rtol=0)  # bf16 rounding, not a different path
    with pytest.raises(ValueError, match="unknown dtype 'int8'"):
        cast_base(model, "int8")


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("kv_heads", [1, 2, 4])
def test_shared_prefix_attention_equals_causal_attention(fused, kv_heads):
    """Rows that continue one batch-1 prefix, attended with the prefix read in place (the fused kernel's
    log-sum-exp or the plain matmul form), equal causal attention over prefix + row, GQA included."""
    from types import SimpleNamespace

    from transformers.cache_utils import DynamicCache

    from lolcats.eval.shared_prefix import _prefix_attention_forward

    torch.manual_seed(0)
    b, h, p, t, d = 3, 4, 37, 11, 16
    pk, pv = torch.randn(1, kv_heads, p, d), torch.randn(1, kv_heads, p, d)
    q, k, v = torch.randn(b, h, t, d), torch.randn(b, kv_heads, t, d), torch.randn(b, kv_heads, t, d)
    prefix = DynamicCache()
    prefix.update(pk, pv, 0)
    module = SimpleNamespace(layer_idx=0)
    out, _ = _prefix_attention_forward(module, q, k, v, None, scaling=0.3, lolcats_prefix=prefix, lolcats_fused=fused)
    keys = torch.cat([pk.expand(b, -1, -1, -1), k], 2).repeat_interleave(h // kv_heads, 1)
    values = torch.cat([pv.expand(b, -1, -1, -1), v], 2).repeat_interleave(h // kv_heads, 1)
    mask = torch.ones(t, p + t, dtype=torch.bool).tril(p)
    ref = torch.nn.functional.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=0.3)
    assert out.shape == (b, t, h, d)
    torch.testing.assert_close(out, ref.transpose(1, 2), atol=1e-5, rtol=1e-5)


def test_shared_prefix_with_softmax_layers_kept(tmp_path, tokenizer):
    """A linearized model with layers kept as softmax: those read the prefix in place, the others read
    the shared state; equal to the uncached path. A sliding window shorter than the prompts
    takes the copy path instead and is still exact."""
    from lolcats.eval.shared_prefix import supports_shared_prefix

    data = load_jsonl(write_jsonl(tmp_path / "m.jsonl"))
    torch.manual_seed(0)
    model = build_tiny("llama", vocab_size=len(tokenizer))
    convert_model(model, AttentionConfig(variant="terraced", window_size=8, chunk_size=8, skip_layers=[0]))
    fast = evaluate_mmlu(model, tokenizer, data, batch_size=4, cached=True)
    slow = evaluate_mmlu(model, tokenizer, data, batch_size=1, cached=False)
    assert _scores(fast)[1] == _scores(slow)[1]
    torch.testing.assert_close(_scores(fast)[0], _scores(slow)[0], atol=1e-4, rtol=0)

    mistral = build_tiny("mistral", vocab_size=len(tokenizer), sliding_window=24)
    assert not supports_shared_prefix(mistral, 100) and supports_shared_prefix(mistral, 24)
    fast = evaluate_mmlu(mistral, tokenizer, data, batch_size=4, cached=True)
    slow = evaluate_mmlu(mistral, tokenizer, data, batch_size=1, cached=False)
    torch.testing.assert_close(_scores(fast)[0], _scores(slow)[0], atol=1e-4, rtol=0)
    assert mistral.config._attn_implementation == "sdpa"
