"""lm-eval harness adapter: run harness tasks on a loaded (possibly linearized) model.

The model object is handed to lm-eval's HF backend as it is, so linearized layers, their chunked
prefill and constant-size decode state are what the harness measures. Needs the optional extra
``pip install 'lolcats[eval]'`` (lm-eval 0.4.x). The paper's zero-shot table uses PIQA, ARC-easy,
ARC-challenge, HellaSwag and WinoGrande; their data comes from the HF hub, so they run wherever the
hub is reachable; local task folders (``include_path``) run anywhere.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

PAPER_TASKS = ("piqa", "arc_easy", "arc_challenge", "hellaswag", "winogrande")
METRICS = ("acc", "acc_norm")


def run_harness(model: nn.Module, tokenizer, tasks: Sequence[str], *, num_fewshot: int | None = None,
                limit: int | None = None, batch_size: int = 1, include_path: str | None = None) -> dict:
    """lm-eval ``simple_evaluate`` on ``model``; returns ``{"results": {task: {metric: value}}, "versions"}``."""
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError as e:
        raise ImportError("`lolcats eval harness` needs lm-eval: pip install 'lolcats[eval]'") from e
    manager = TaskManager(include_path=include_path) if include_path else TaskManager()
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise ValueError(f"unknown lm-eval task(s) {', '.join(unknown)}; e.g. {', '.join(PAPER_TASKS)}, or pass "
                         "--include-path with a folder of task YAMLs")
    device = str(next(model.parameters()).device)
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=device)
    try:
        out = lm_eval.simple_evaluate(model=lm, tasks=list(tasks), num_fewshot=num_fewshot, limit=limit,
                                      task_manager=manager, bootstrap_iters=0)
    except (ConnectionError, OSError) as e:
        raise RuntimeError(f"lm-eval could not load the data of {', '.join(tasks)} ({type(e).__name__}: {e}); "
                           "these tasks need the HF hub, or a local copy through --include-path") from e
    results = {}
    for task, metrics in out["results"].items():
        picked = {}
        for key, value in metrics.items():
            name = key.split(",")[0]
            if name in METRICS and isinstance(value, (int, float)):
                picked[name] = float(value)
        results[task] = picked
    return {"results": results, "lm_eval_version": lm_eval.__version__,
            "n_samples": {k: v.get("effective") for k, v in out.get("n-samples", {}).items()}}


def table(result: dict) -> str:
    lines = ["| task | acc | acc_norm |", "|---|---:|---:|"]
    for task, m in sorted(result["results"].items()):
        cells = [f"{100 * m[k]:.2f}" if k in m else "–" for k in METRICS]
        lines.append(f"| {task} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
