"""Our 5-shot MMLU against lm-eval 0.4.x on the same items, exemplars and prompt (offline).

    python scripts/compare_lm_eval.py [--model lolcats:smollm2-135m-instruct] [--limit 2]

Writes one lm-eval task per subject (local JSON data files; exemplars = the same five items, taken in
order with lm-eval's ``first_n`` sampler) and runs lm-eval's HF backend on the loaded model, then
compares per item: the prompt text, the prediction, and the four log-probabilities. Prints the
agreement, every disagreement with its top-two margin, and both run times; writes JSON.
Needs the optional extra: pip install 'lolcats[eval]'.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import torch  # noqa: E402

from lolcats.checkpoint import load_model_any  # noqa: E402
from lolcats.eval.mmlu import build_prompt, evaluate_mmlu  # noqa: E402
from lolcats.eval.mmlu_data import LETTERS, load_mmlu  # noqa: E402

TASK_YAML = """task: {task}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {test}
    dev: {dev}
test_split: test
fewshot_split: dev
fewshot_config:
  sampler: first_n
num_fewshot: 5
output_type: multiple_choice
description: "The following are multiple choice questions (with answers) about {subject}.\\n\\n"
doc_to_text: "{{{{question.strip()}}}}\\nA. {{{{choices[0]}}}}\\nB. {{{{choices[1]}}}}\\n\\
C. {{{{choices[2]}}}}\\nD. {{{{choices[3]}}}}\\nAnswer:"
doc_to_choice: ["A", "B", "C", "D"]
doc_to_target: answer
target_delimiter: " "
fewshot_delimiter: "\\n\\n"
metric_list:
  - metric: acc
"""


def write_tasks(data, folder: Path) -> dict[str, str]:
    """One lm-eval task per subject; returns task name -> subject."""
    tasks = {}
    for subject in data.subjects:
        name = "lolcats_mmlu_" + re.sub(r"\W", "_", subject)
        for split, items in (("test", data.test[subject]), ("dev", data.dev[subject])):
            rows = [{"question": it.question, "choices": list(it.choices), "answer": it.answer} for it in items]
            (folder / f"{name}_{split}.json").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
        (folder / f"{name}.yaml").write_text(TASK_YAML.format(
            task=name, subject=subject, test=folder / f"{name}_test.json", dev=folder / f"{name}_dev.json"))
        tasks[name] = subject
    return tasks


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="lolcats:smollm2-135m-instruct", help="as `lolcats eval mmlu MODEL`")
    ap.add_argument("--limit", type=int, default=2, help="scored items per subject")
    ap.add_argument("--subjects", nargs="+", help="restrict to these subjects (default: all 57)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", default="docs/compare_lm_eval.json")
    args = ap.parse_args()
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    torch.set_num_threads(args.threads)
    data = load_mmlu(None).select(args.subjects, args.limit)
    model, tokenizer = load_model_any(args.model, device="cpu")

    t0 = time.perf_counter()
    ours = evaluate_mmlu(model, tokenizer, data, shots=5, batch_size=8)
    ours_s = time.perf_counter() - t0

    with tempfile.TemporaryDirectory() as tmp:
        tasks = write_tasks(data, Path(tmp))
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=1, device="cpu")
        t0 = time.perf_counter()
        res = lm_eval.simple_evaluate(model=lm, tasks=sorted(tasks), num_fewshot=5, log_samples=True,
                                      task_manager=TaskManager(include_path=tmp), bootstrap_iters=0)
        theirs_s = time.perf_counter() - t0

    by_key = {(p["subject"], p["index"]): p for p in ours["predictions"]}
    rows, prompt_mismatch = [], 0
    for task, subject in tasks.items():
        for s in res["samples"][task]:
            i = s["doc_id"]
            lps = [float(r[0]) for r in s["resps"]] if not isinstance(s["resps"][0][0], (list, tuple)) \
                else [float(r[0][0]) for r in s["resps"]]
            args0 = s["arguments"][0] if isinstance(s["arguments"], list) else s["arguments"]["gen_args_0"]
            context = args0[0] if isinstance(args0, (list, tuple)) else args0["arg_0"]
            item = data.test[subject][i]
            if context != build_prompt(subject, data.dev[subject][:5], item):
                prompt_mismatch += 1
            top = sorted(lps, reverse=True)
            mine = by_key[(subject, i)]
            rows.append({"subject": subject, "index": i, "lm_eval_prediction": LETTERS[lps.index(max(lps))],
                         "our_prediction": mine["prediction"], "lm_eval_logprobs": lps, "our_logprobs": mine["logprobs"],
                         "lm_eval_margin": top[0] - top[1],
                         "max_abs_diff": max(abs(a - b) for a, b in zip(lps, mine["logprobs"], strict=True))})
    agree = sum(r["lm_eval_prediction"] == r["our_prediction"] for r in rows)
    disagreements = [r for r in rows if r["lm_eval_prediction"] != r["our_prediction"]]
    summary = {
        "model": args.model, "items": len(rows), "agreement": agree / len(rows), "agree": agree,
        "prompt_mismatches": prompt_mismatch, "max_logprob_diff": max(r["max_abs_diff"] for r in rows),
        "disagreement_margins": [r["lm_eval_margin"] for r in disagreements],
        "ours_seconds": ours_s, "lm_eval_seconds": theirs_s, "lm_eval_version": lm_eval.__version__,
        "our_accuracy": ours["micro_accuracy"],
        "lm_eval_accuracy": sum(r["lm_eval_prediction"] == LETTERS[data.test[r["subject"]][r["index"]].answer]
                                for r in rows) / len(rows),
    }
    print("| items | agreement | prompts differing | max |Δ log p| | disagreement margins | ours (s) | lm-eval (s) |")
    print("|---:|---:|---:|---:|---|---:|---:|")
    print(f"| {len(rows)} | {agree}/{len(rows)} ({100 * agree / len(rows):.1f}%) | {prompt_mismatch} | "
          f"{summary['max_logprob_diff']:.1e} | {', '.join(f'{m:.1e}' for m in summary['disagreement_margins']) or '–'} | "
          f"{ours_s:.0f} | {theirs_s:.0f} |")
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"summary": summary, "items": rows}, indent=1))
    print(f"JSON written to {out}")


if __name__ == "__main__":
    main()
