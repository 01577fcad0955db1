"""Perplexity by position, KL to a teacher and top-1 agreement; the passkey task."""

from __future__ import annotations

import copy
import json
import math

import torch

from lolcats import AttentionConfig, convert_model
from lolcats.cli import main
from lolcats.data import Chunks
from lolcats.eval.perplexity import perplexity, token_metrics
from tests.conftest import build_tiny, make_corpus, make_tiny_model_folder


def _chunks(vocab: int, windows: int = 2, t: int = 300, seed: int = 0) -> Chunks:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (windows, t), generator=g)
    return Chunks(ids, ids.clone())


def test_token_metrics_match_plain_perplexity_and_bucket_by_position():
    torch.manual_seed(0)
    model = build_tiny("llama").eval()
    chunks = _chunks(model.config.vocab_size)
    r = token_metrics(model, chunks, slice_len=64, buckets=((0, 100), (100, 200), (200, 512)))
    assert math.isclose(r["ppl"], perplexity(model, chunks), rel_tol=1e-5)
    assert r["tokens"] == 2 * 299
    assert [b["tokens"] for b in r["by_position"].values()] == [2 * 99, 2 * 100, 2 * 100]
    # the bucket perplexities recombine (geometric, token-weighted) into the overall one
    log_total = sum(math.log(b["ppl"]) * b["tokens"] for b in r["by_position"].values())
    assert math.isclose(log_total / r["tokens"], math.log(r["ppl"]), rel_tol=1e-6)


def test_kl_and_agreement_against_a_teacher():
    torch.manual_seed(0)
    teacher = build_tiny("llama").eval()
    chunks = _chunks(teacher.config.vocab_size, windows=1, t=200)
    same = token_metrics(copy.deepcopy(teacher), chunks, teacher)
    assert abs(same["kl"]) < 1e-6 and same["top1_agreement"] == 1.0
    assert math.isclose(same["ppl"], same["teacher_ppl"], rel_tol=1e-6)
    student = copy.deepcopy(teacher)
    convert_model(student, AttentionConfig(variant="sliding_window", window_size=8, chunk_size=8))
    r = token_metrics(student, chunks, teacher, slice_len=50)
    assert r["kl"] > 1e-4 and 0 <= r["top1_agreement"] < 1
    # KL computed by hand on the full logits
    with torch.no_grad():
        lt = torch.log_softmax(teacher(chunks.input_ids[:1]).logits[0, :-1].float(), -1)
        ls = torch.log_softmax(student(chunks.input_ids[:1]).logits[0, :-1].float(), -1)
    assert math.isclose(r["kl"], float((lt.exp() * (lt - ls)).sum(-1).mean()), rel_tol=1e-4)
    assert math.isclose(r["top1_agreement"], float((lt.argmax(-1) == ls.argmax(-1)).float().mean()), rel_tol=1e-6)


def test_eval_ppl_cli_with_teacher_and_json(tmp_path, capsys):
    folder = make_tiny_model_folder(tmp_path / "model")
    data = make_corpus(tmp_path / "corpus", docs=4, words=400)
    out = tmp_path / "ppl.json"
    rc = main(["eval", "ppl", str(folder), "--data", str(data), "--seq-len", "600", "--windows", "1",
               "--teacher", str(folder), "--out", str(out)])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "KL(teacher‖model) 0.0000" in printed and "top-1 agreement 100.00%" in printed and "| 512–1k |" in printed
    record = json.loads(out.read_text())
    assert record["teacher"] == str(folder) and set(record["by_position"]) == {"0–512", "512–1k"}
