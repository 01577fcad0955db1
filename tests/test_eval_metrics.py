"""Perplexity by position, KL to a teacher and top-1 agreement; the passkey task."""

from __future__ import annotations

import copy
import json
import math

import pytest
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


# ---------------------------------------------------------------------------------------- passkey

@pytest.fixture
def finished(tiny_run):
    from lolcats.config import load_config
    from lolcats.pipeline import linearize

    recipe, root = tiny_run
    linearize(load_config(str(recipe)))
    return None, root


PASSKEY_WORDS = ("There is an important info hidden inside a lot of irrelevant text Find it and memorize I will quiz "
                 "you about the information there grass green sky blue sun yellow Here we go back again pass key "
                 "Remember What ? . 12345 54321")


def test_passkey_prompt_length_and_depth(tmp_path):
    from lolcats.eval.passkey import FILLER, NEEDLE, build_prompt, first_number
    from tests.conftest import make_tokenizer

    tok = make_tokenizer(tmp_path, PASSKEY_WORDS)
    for length in (200, 400):
        for depth in (0.0, 0.5, 1.0):
            text = build_prompt(tok, length, depth, 12345)
            n = len(tok(text, add_special_tokens=False).input_ids)
            assert length - 25 <= n <= length
            reps = text.count(FILLER)
            before = text[: text.index(NEEDLE.format(key=12345))].count(FILLER)
            assert reps >= 3 and before == round(depth * reps)
    assert first_number(" 54321. Remember") == 54321 and first_number(" none") is None
    with pytest.raises(ValueError, match="depth must be between 0 and 1"):
        build_prompt(tok, 100, 1.5, 1)
    with pytest.raises(ValueError, match="no room for filler"):
        build_prompt(tok, 10, 0.5, 1)


def test_passkey_cli_on_a_linearized_out_dir(finished, tmp_path, capsys):
    """End to end on a linearized checkpoint: the grid has one cell per (length, depth), JSON and PNG land."""
    _, root = finished
    out = tmp_path / "pk"
    rc = main(["eval", "passkey", str(root / "out"), "--lengths", "128", "200", "--depths", "0", "1",
               "--trials", "1", "--final-window", "0", "--out", str(out)])
    assert rc == 0
    record = json.loads((out / "passkey.json").read_text())
    assert len(record["grid"]) == 2 and all(len(r) == 2 for r in record["grid"])
    assert len(record["runs"]) == 4 and all(r["tokens"] <= r["length"] + 1 for r in record["runs"])
    assert (out / "passkey.png").stat().st_size > 1000
    assert "| 200 |" in capsys.readouterr().out
    assert main(["eval", "passkey", str(root / "out"), "--lengths", "100000"]) == 2
    assert "position limit" in capsys.readouterr().err


# ----------------------------------------------------------------------------------- lm-eval adapter

TASK = """task: lolcats_tiny_choice
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{q}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: label
metric_list:
  - metric: acc
"""


def test_harness_adapter_runs_a_local_task_on_a_linearized_model(finished, tmp_path, capsys):
    """lm-eval receives the loaded linearized model; its accuracy equals the choice log-likelihoods we
    compute ourselves on the same model."""
    pytest.importorskip("lm_eval", reason="the `eval` extra (installed by scripts/setup.sh)")
    from lolcats.checkpoint import load_model_any
    from tests.conftest import WORDS

    _, root = finished
    rng = __import__("random").Random(0)
    docs = [{"q": " ".join(rng.choice(WORDS) for _ in range(12)),
             "choices": [" ".join(rng.choice(WORDS) for _ in range(3)) for _ in range(3)], "label": rng.randrange(3)}
            for _ in range(6)]
    (tmp_path / "data.json").write_text("\n".join(json.dumps(d) for d in docs))
    (tmp_path / "task.yaml").write_text(TASK.format(data=tmp_path / "data.json"))
    out = tmp_path / "h.json"
    rc = main(["eval", "harness", str(root / "out"), "--tasks", "lolcats_tiny_choice", "--include-path",
               str(tmp_path), "--out", str(out)])
    assert rc == 0, capsys.readouterr().err
    acc = json.loads(out.read_text())["results"]["lolcats_tiny_choice"]["acc"]

    model, tok = load_model_any(str(root / "out"))
    correct = 0
    with torch.no_grad():
        for d in docs:
            ctx = tok(d["q"], add_special_tokens=False).input_ids
            scores = []
            for c in d["choices"]:
                whole = tok(d["q"] + " " + c, add_special_tokens=False).input_ids
                logp = torch.log_softmax(model(torch.tensor([whole])).logits[0].float(), -1)
                scores.append(sum(float(logp[i - 1, whole[i]]) for i in range(len(ctx), len(whole))))
            correct += scores.index(max(scores)) == d["label"]
    assert acc == pytest.approx(correct / len(docs))
    assert main(["eval", "harness", str(root / "out"), "--tasks", "no_such_task_xyz"]) == 2
    assert "unknown lm-eval task" in capsys.readouterr().err
