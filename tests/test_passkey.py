"""Retrieval evaluation (`lolcats eval passkey`): prompt layout, multi-needle prompts, scoring, cache bytes."""

from __future__ import annotations

import json
import random
import re

import pytest
import torch
from conftest import _text, build_tiny, make_tiny_model_folder, make_tokenizer

from lolcats import AttentionConfig, convert_model
from lolcats.cli import main
from lolcats.eval import needles, passkey

WORDS = ("There is an important info hidden inside a lot of irrelevant text Find it and memorize I will quiz "
         "you about the information there grass green sky blue sun yellow Here we go back again pass key "
         "Remember What ? . Some secret numbers are long them one quiz number for red lion")


@pytest.fixture
def tok(tmp_path):
    return make_tokenizer(tmp_path / "tok", WORDS)


def count(tok, text: str) -> int:
    return len(tok(text, add_special_tokens=False).input_ids)


def haystack_text(sentences: int = 60) -> str:
    return " ".join(_text(i, 15) for i in range(sentences))


# ----------------------------------------------------------------------------------------- layout

@pytest.mark.parametrize("length", [300, 500])
def test_passkey_needle_at_its_depth_and_out_of_the_final_window(tok, length):
    needle = passkey.NEEDLE.format(key=12345)
    before, after = {}, {}
    for depth in (0.0, 0.5, 1.0):
        text = passkey.build_prompt(tok, length, depth, 12345, final_window=64)
        assert length - 25 <= count(tok, text) <= length
        at = text.index(needle)
        before[depth] = text[:at].count(passkey.FILLER)
        after[depth] = count(tok, text[at + len(needle):])
        assert after[depth] >= 64
    assert before[0.0] == 0 and before[1.0] >= 3 and before[0.5] == round(0.5 * before[1.0])
    # depth 1 puts the needle right before the final window, not a filler piece earlier
    assert after[1.0] < 64 + count(tok, passkey.FILLER) + count(tok, passkey.QUESTION)


def test_a_length_too_short_for_the_final_window_is_refused(tok):
    passkey.build_prompt(tok, 200, 0.9, 1, final_window=0)
    with pytest.raises(ValueError, match=r"length 200 is too short .* final window of 160 tokens.*--final-window"):
        passkey.build_prompt(tok, 200, 0.9, 1, final_window=160)
    with pytest.raises(ValueError, match="depth must be between 0 and 1"):
        passkey.build_prompt(tok, 300, 1.2, 1, final_window=64)


def test_default_lengths_stop_below_the_position_limit():
    assert passkey.default_lengths(8192) == [1024, 2048, 4096, 8000]
    assert passkey.default_lengths(None) == [1024, 2048, 4096, 8000]
    assert passkey.default_lengths(4096) == [1024, 2048, 4084]
    assert passkey.default_lengths(512) == [500]


def test_the_final_window_must_cover_the_models_softmax_window():
    model = build_tiny("llama")
    convert_model(model, AttentionConfig(variant="terraced", window_size=8, feature_dim=8))  # 16 exact slots
    passkey.check_model(model, [300], final_window=16)
    with pytest.raises(ValueError, match="keeps the last 16 tokens exact.*--final-window 16"):
        passkey.check_model(model, [300], final_window=8)
    with pytest.raises(ValueError, match="length 510 plus the answer is past the model's position limit of 512"):
        passkey.check_model(model, [300, 510], final_window=16)


# ------------------------------------------------------------------------------------ multi-needle

def test_multi_needle_prompt_hides_every_pair_and_asks_one(tok):
    hay = needles.Haystack.from_text(haystack_text(), tok)
    assert len(hay.pieces) == 60 and "".join(hay.pieces).startswith(_text(0, 15))
    pairs = needles.draw_pairs(random.Random(3), 4)
    assert len({w for w, _ in pairs}) == 4 and len({n for _, n in pairs}) == 4
    assert all(w in needles.WORDS and 10_000 <= n <= 99_999 for w, n in pairs)
    depths = needles.needle_depths(4)
    assert depths[0] == 0.1 and depths[-1] == 0.9 and depths == sorted(depths)
    text = needles.build_prompt(tok, 400, hay, pairs, depths, asked=2, start=7, final_window=64)
    assert count(tok, text) <= 400
    spots = [text.index(needles.NEEDLE.format(word=w, number=n)) for w, n in pairs]
    assert spots == sorted(spots)  # in depth order
    assert text.endswith(needles.QUESTION.format(word=pairs[2][0]))
    last = spots[-1] + len(needles.NEEDLE.format(word=pairs[-1][0], number=pairs[-1][1]))
    assert count(tok, text[last:]) >= 64
    assert hay.pieces[7].strip() in text[:spots[0]]  # the text starts at sentence 7
    other = needles.build_prompt(tok, 400, hay, pairs, depths, asked=2, start=30, final_window=64)
    assert other != text and hay.pieces[30].strip() in other


def test_multi_needle_haystack_needs_sentences(tok):
    with pytest.raises(ValueError, match="no sentences"):
        needles.Haystack.from_text("no full stop here", tok)
    with pytest.raises(ValueError, match="between 1 and 24"):
        needles.draw_pairs(random.Random(0), 25)


# ----------------------------------------------------------------------------------------- scoring

def fake_answer(rule):
    """An `answer` stand-in: ``rule(prompt)`` gives the text answered; the cache "holds" 10 bytes a token."""
    def answer(model, tokenizer, prompt, stop):
        n = len(tokenizer(prompt).input_ids)
        return rule(prompt), n, 10 * n
    return answer


def test_passkey_scoring_by_length_and_depth(tok, monkeypatch):
    """Right when the needle is in the prompt's first half: a depth 0.1 column of 100 %, 0.9 of 0 %."""
    def first_half(prompt: str) -> str:
        key = re.search(r"pass key is (\d+)", prompt).group(1)
        return f" {key}." if prompt.index(key) < len(prompt) / 2 else " 10000."

    monkeypatch.setattr(passkey, "answer", fake_answer(first_half))
    model = build_tiny("llama", vocab_size=len(tok))
    r = passkey.passkey_accuracy(model, tok, [300, 400], [0.1, 0.9], trials=3, seed=1, final_window=64)
    assert r["task"] == "passkey" and r["grid"] == [[1.0, 0.0], [1.0, 0.0]]
    assert r["by_length"] == {"300": 0.5, "400": 0.5} and r["accuracy"] == 0.5 and len(r["runs"]) == 12
    assert len({run["key"] for run in r["runs"]}) == 12
    for n in ("300", "400"):
        tokens = max(run["tokens"] for run in r["runs"] if str(run["length"]) == n)
        assert r["prompt_tokens"][n] == tokens and r["cache_bytes"][n] == 10 * tokens
        assert r["softmax_kv_bytes"][n] == passkey.softmax_kv_bytes(model, tokens)
    again = passkey.passkey_accuracy(model, tok, [300, 400], [0.1, 0.9], trials=3, seed=1, final_window=64)
    assert [run["key"] for run in again["runs"]] == [run["key"] for run in r["runs"]]
    printed = passkey.table(r)
    assert "| 300 | 100% | 0% | 50% |" in printed and f"{r['cache_bytes']['400']:,}" in printed


@pytest.mark.parametrize("right", [True, False], ids=["asked-pair", "another-pair"])
def test_multi_needle_scores_the_asked_pair(tok, tmp_path, monkeypatch, right):
    (tmp_path / "book").mkdir()
    (tmp_path / "book" / "book.txt").write_text(haystack_text())

    def reply(prompt: str) -> str:
        word = re.search(r"What is the secret number for (\w+)\?", prompt).group(1)
        found = dict(re.findall(r"The secret number for (\w+) is (\d+)\.", prompt))
        assert len(found) == 3 and word in found
        return " " + (found[word] if right else next(n for w, n in found.items() if w != word))

    monkeypatch.setattr(passkey, "answer", fake_answer(reply))
    model = build_tiny("llama", vocab_size=len(tok))
    r = needles.multi_needle_accuracy(model, tok, [300], [0.1, 0.5, 0.9], trials=4, seed=0,
                                      data=str(tmp_path / "book"), final_window=64)
    assert r["task"] == "multi-needle" and r["needles"] == 3 and r["grid"] == [[float(right)] * 3]
    asked = [run["depth"] for run in r["runs"]]
    assert asked == [0.1] * 4 + [0.5] * 4 + [0.9] * 4
    assert all(next(n["depth"] for n in run["needles"] if n["word"] == run["word"]) == run["depth"]
               for run in r["runs"])
    assert len({run["text_start"] for run in r["runs"]}) > 6  # a new stretch of text per prompt
    again = needles.multi_needle_accuracy(model, tok, [300], [0.1, 0.5, 0.9], trials=4, seed=0,
                                          data=str(tmp_path / "book"), final_window=64)
    assert [run["needles"] for run in again["runs"]] == [run["needles"] for run in r["runs"]]


# -------------------------------------------------------------------------------------- cache bytes

def test_greedy_answer_equals_generate():
    model = build_tiny("llama")
    convert_model(model, AttentionConfig(variant="terraced", window_size=8, feature_dim=8))
    ids = torch.randint(3, 128, (1, 40), generator=torch.Generator().manual_seed(0))
    tokens, _ = passkey.greedy_answer(model, ids, 8, stop=set())
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=8, min_new_tokens=8, do_sample=False, pad_token_id=0)
    assert tokens == out[0, 40:].tolist()
    first = tokens[0]
    assert passkey.greedy_answer(model, ids, 8, stop={first})[0] == []


def cache_bytes(model, tokens: int) -> int:
    ids = torch.randint(3, 128, (1, tokens), generator=torch.Generator().manual_seed(tokens))
    return passkey.greedy_answer(model, ids, 1, stop=set())[1]


def test_cache_bytes_constant_for_linearized_and_linear_in_length_for_softmax():
    softmax = build_tiny("llama", max_position_embeddings=2048)
    assert cache_bytes(softmax, 400) == 4 * cache_bytes(softmax, 100) == passkey.softmax_kv_bytes(softmax, 400)
    linear = build_tiny("llama", max_position_embeddings=2048)
    convert_model(linear, AttentionConfig(variant="terraced", window_size=8, feature_dim=8, sink_tokens=4))
    assert cache_bytes(linear, 100) == cache_bytes(linear, 400) > 0
    hybrid = build_tiny("llama", max_position_embeddings=2048)
    convert_model(hybrid, AttentionConfig(variant="terraced", window_size=8, feature_dim=8, skip_layers=[0]))
    # the softmax layer's keys/values live in the same cache and are counted: one layer's KV of 300 tokens
    assert cache_bytes(hybrid, 400) - cache_bytes(hybrid, 100) == passkey.softmax_kv_bytes(hybrid, 300) // 2


# --------------------------------------------------------------------------------------------- CLI

def test_cli_passkey_defaults_and_multi_needle(tmp_path, capsys):
    """A tiny model (512 positions): the default lengths ([500]), depths and trials; JSON, PNG and the table;
    then the multi-needle task over a local text."""
    base = make_tiny_model_folder(tmp_path / "base", extra_words=WORDS)
    out = tmp_path / "pk"
    assert main(["eval", "passkey", str(base), "--final-window", "64", "--out", str(out)]) == 0
    record = json.loads((out / "passkey.json").read_text())
    assert record["lengths"] == [500] and record["depths"] == [0.1, 0.3, 0.5, 0.7, 0.9] and record["trials"] == 2
    assert len(record["runs"]) == 10 and all(r["tokens"] <= 501 for r in record["runs"])
    kv = record["softmax_kv_bytes"]["500"]
    assert record["cache_bytes"]["500"] == kv > 0  # a softmax model: its cache is the full KV
    assert (out / "passkey.png").stat().st_size > 1000
    printed = capsys.readouterr().out
    assert f"| {kv:,} | {kv:,} |" in printed and "(10 per length)" in printed

    (tmp_path / "book").mkdir()
    (tmp_path / "book" / "book.txt").write_text(haystack_text())
    assert main(["eval", "passkey", str(base), "--task", "multi-needle", "--data", str(tmp_path / "book"),
                 "--lengths", "300", "--needles", "2", "--trials", "1", "--final-window", "64", "--out", str(out)]) == 0
    record = json.loads((out / "multi_needle.json").read_text())
    assert record["task"] == "multi-needle" and record["depths"] == [0.1, 0.9] and len(record["runs"]) == 2
    assert all(len(r["needles"]) == 2 for r in record["runs"]) and "300" in record["cache_bytes"]
    assert "length \\ asked depth" in capsys.readouterr().out


@pytest.mark.parametrize(("argv", "message"), [
    (["--needles", "3"], "--needles and --data set up the multi-needle task"),
    (["--task", "multi-needle", "--needles", "3", "--depths", "0.2", "0.8"], "--needles 3 but 2 --depths"),
    (["--lengths", "150"], "length 150 is too short to keep a needle out of the prompt's final window of 128"),
    (["--lengths", "600"], "past the model's position limit of 512"),
], ids=["needles-without-task", "needles-vs-depths", "too-short", "too-long"])
def test_cli_refuses_bad_options(tmp_path, capsys, argv, message):
    base = make_tiny_model_folder(tmp_path / "base", extra_words=WORDS)
    assert main(["eval", "passkey", str(base), "--out", str(tmp_path / "pk"), *argv]) == 2
    assert message in capsys.readouterr().err
