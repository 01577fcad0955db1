from __future__ import annotations

import json

import pytest
import torch
from conftest import make_tokenizer

from lolcats.data import IGNORE, Document, build_train_data, load_documents, pack, tokenize_stream


@pytest.fixture
def tok(tmp_path):
    return make_tokenizer(tmp_path / "tok")


def test_alpaca_prompts_are_masked(tmp_path, tok):
    path = tmp_path / "alpaca.jsonl"
    rows = [{"instruction": "the time", "input": "", "output": "he said no"},
            {"instruction": "the man", "input": "one two", "output": "it was new"}]
    path.write_text("\n".join(json.dumps(r) for r in rows))
    docs = load_documents(str(path))
    assert docs[0].prompt.startswith("Below is an instruction") and docs[0].text == "he said no"
    assert "### Input:\none two" in docs[1].prompt
    ids, labels = tokenize_stream(docs, tok)
    prompt_len = len(tok(docs[0].prompt, add_special_tokens=False)["input_ids"])
    assert (labels[:prompt_len] == IGNORE).all()
    body = tok("he said no", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert labels[prompt_len : prompt_len + len(body)].tolist() == body == ids[prompt_len : prompt_len + len(body)].tolist()


def test_alpaca_json_list_and_text_jsonl(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps([{"instruction": "x", "output": "y"}]))
    (doc,) = load_documents(str(tmp_path / "a.json"))
    assert doc == Document(text="y", prompt=doc.prompt) and doc.prompt.endswith("### Response:\n")
    (tmp_path / "t.jsonl").write_text('{"text": "hello"}\n\n{"text": "world"}\n')
    assert [d.text for d in load_documents(str(tmp_path / "t.jsonl"))] == ["hello", "world"]


def test_bad_records_name_file_and_line(tmp_path):
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"question": "no"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: a record needs 'text'.*got keys \['question'\]"):
        load_documents(str(tmp_path / "bad.jsonl"))
    (tmp_path / "broken.jsonl").write_text('{"text": "ok"}\n{oops\n')
    with pytest.raises(ValueError, match=r"broken.jsonl:2: not valid JSON"):
        load_documents(str(tmp_path / "broken.jsonl"))


def test_folder_order_and_filters(tmp_path):
    for name in ("chapter_10.txt", "chapter_2.txt", "chapter_1.txt"):
        (tmp_path / name).write_text(name)
    assert [d.text for d in load_documents(str(tmp_path))] == ["chapter_1.txt", "chapter_2.txt", "chapter_10.txt"]
    assert [d.text for d in load_documents(str(tmp_path), before="chapter_2")] == ["chapter_1.txt", "chapter_10.txt"]
    with pytest.raises(ValueError, match="no .txt/.jsonl/.json files match the filter"):
        load_documents(str(tmp_path), from_="zzz")


def test_missing_data_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope does not exist"):
        load_documents(str(tmp_path / "nope"))


def test_packing_and_heldout_split_are_deterministic(tmp_path, tok):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "a.txt").write_text(" ".join(["the time of man"] * 60))
    train, held = build_train_data(str(tmp_path / "d"), tok, 16, 2)
    train2, held2 = build_train_data(str(tmp_path / "d"), tok, 16, 2)
    assert torch.equal(train.input_ids, train2.input_ids) and torch.equal(held.input_ids, held2.input_ids)
    assert train.input_ids.shape[1] == 16 and len(held) == 2
    with pytest.raises(ValueError, match="fewer than one chunk of data.seq_len=100000"):
        pack(torch.arange(10), torch.arange(10), 100000, "x")
