"""report.md and the per-layer attention-MSE plot of a linearization run."""

from __future__ import annotations

import math
import platform
from pathlib import Path
from typing import Any

from lolcats.eval.long_context import long_context_section
from lolcats.eval.perplexity import gap_closure
from lolcats.io import atomic_write_text

ROWS = [
    ("original", "original (softmax)"),
    ("window_only", "sliding window only (no linear term)"),
    ("window_sinks", "sliding window + attention sinks"),
    ("converted", "converted, before training"),
    ("stage1", "after stage 1 (attention transfer)"),
    ("softmax_layers", "after stage 1, chosen layers back to softmax"),
    ("stage2", "after stage 2 (LoRA)"),
]


BASELINES = ("original", "window_only", "window_sinks")
DOMAINS = ("in_domain", "out_of_domain")
LONG_CONTEXT_ROWS = {"original": "original (softmax)", "window_only": "sliding window only",
                     "window_sinks": "sliding window + attention sinks", "final": "linearized (final model)"}


def _closures(evals: dict[str, Any], key: str, baseline: str) -> list[str]:
    """Gap-closure cells of row ``key`` from ``baseline`` toward the original, one per domain ('' for baselines)."""
    base, orig = evals.get(baseline), evals.get("original")
    if not (base and orig) or key in BASELINES:
        return ["" for _ in DOMAINS]
    return [f"{100 * gap_closure(base[d], evals[key][d], orig[d]):.1f}%" for d in DOMAINS]


def perplexity_table(evals: dict[str, Any]) -> str:
    """Markdown table of in-domain / out-of-domain perplexity and gap closure per row: from the window-only
    baseline, and (when measured) from the window + sinks baseline."""
    sinks = "window_sinks" in evals
    head = "| model | in-domain ppl | out-of-domain ppl | closure in-domain | closure out-of-domain |"
    if sinks:
        head += " closure from window+sinks in-domain | closure from window+sinks out-of-domain |"
    lines = [head, "|---|---:|---:|---:|---:|" + ("---:|---:|" if sinks else "")]
    for key, label in ROWS:
        if key not in evals:
            continue
        row = evals[key]
        if row.get("sinks"):
            label = f"sliding window + {row['sinks']} attention sinks"
        cells = [label, f"{row['in_domain']:.2f}", f"{row['out_of_domain']:.2f}", *_closures(evals, key, "window_only")]
        if sinks:
            cells += _closures(evals, key, "window_sinks")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_mse(before: list[float], after: list[float] | None, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.5))
    layers = list(range(len(before)))
    ax.plot(layers, before, "o-", label="before stage 1")
    if after:
        ax.plot(layers, after, "o-", label="after stage 1")
    ax.set_yscale("log")
    ax.set_xlabel("layer")
    ax.set_ylabel("held-out attention MSE")
    ax.set_title("Attention transfer: per-layer output MSE vs softmax")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(path)


def layer_choice_section(choice: dict[str, Any]) -> list[str]:
    """report.md's "Softmax layers" section: the layers kept as softmax and, when measured, both rankings
    (:func:`lolcats.layer_choice.rank_layers`)."""
    n = choice["softmax_layers"]
    parts = [f"## Softmax layers (attention.softmax_layers = {n})", ""]
    if "by_hand" in choice:
        layers = ", ".join(map(str, choice["by_hand"]))
        return parts + [f"`attention.skip_layers` given by hand wins over `attention.softmax_layers`: layers {layers} "
                        "stay softmax as the recipe says; no ranking was measured.", ""]
    crit = choice["criterion"]
    ranks = {name: {layer: r + 1 for r, layer in enumerate(order)} for name, order in choice["ranking"].items()}
    top = choice["kl_top_restored"]
    parts += [
        f"{'Layers' if n > 1 else 'Layer'} **{', '.join(map(str, choice['chosen']))}** {'run' if n > 1 else 'runs'} as "
        f"softmax attention from stage 2 on, the top {n} by "
        f"`{crit}` (`attention.softmax_criterion`). Both criteria are measured after stage 1 on the {choice['chunks']} "
        f"held-out chunks ({choice['tokens']:,} tokens): **KL drop**, KL(original ‖ stage-1 model) minus the same KL "
        "with the layer alone restored to softmax; **output error**, the layer's teacher-forced attention error "
        "through o_proj relative to the residual stream entering it, Σ‖o_proj(y_lin − y_softmax)‖² / Σ‖h‖².", "",
        f"KL(original ‖ stage-1 model) = {choice['kl_linearized']:.4g} nats/token; with the top {n} restored together: "
        f"{top['kl_drop']:.4g} by KL drop, {top['output_error']:.4g} by output error.", "",
        "| layer | KL with it restored | KL drop | rank | attention MSE | output error / residual | rank | softmax |",
        "|---:|---:|---:|---:|---:|---:|---:|:---:|"]
    for row in choice["layers"]:
        i = row["layer"]
        parts.append(f"| {i} | {row['kl_restored']:.4g} | {row['kl_drop']:.4g} | {ranks['kl_drop'][i]} | "
                     f"{row['attention_mse']:.4g} | {row['output_error']:.4g} | {ranks['output_error'][i]} | "
                     f"{'yes' if i in choice['chosen'] else ''} |")
    return parts + [""]


def _fmt_seconds(s: float) -> str:
    return f"{s / 60:.1f} min" if s >= 90 else f"{s:.0f} s"


def write_report(path: Path, info: dict[str, Any]) -> str:
    """Write report.md; returns the perplexity table (the CLI prints it)."""
    evals = info["evals"]
    table = perplexity_table(evals)
    mse_before, mse_after = info.get("mse_before"), info.get("mse_after")
    parts = [f"# lolcats report: {info['model']}", ""]
    if info.get("source_note"):
        parts += [f"Base model: {info['source_note']}.", ""]
    a = info["attention"]
    extras = []
    if a.get("sink_tokens"):
        extras.append(f"{a['sink_tokens']} sink tokens")
    if a.get("decay"):
        extras.append(f"decay (λ₀ {a['decay_init']})")
    if a.get("sparse_cache"):
        late = not a.get("sparse_cache_training", True)
        extras.append(f"a sparse cache of {a['sparse_cache']} pairs per key/value head"
                      + (" added after training (the stage-1 row is without it)" if late else ""))
    parts += [
        f"Variant `{a['variant']}`, window {a['window_size']}, feature map `{a['feature_map']}` (f = "
        f"{a['feature_dim']}, init `{a['feature_init']}`){''.join('; ' + e for e in extras)}. Created {info['date']} "
        f"on {info['machine']}.", "",
        "## Held-out perplexity", "",
        f"In-domain: {info['in_domain_desc']}. Out-of-domain: {info['out_of_domain_desc']}. "
        "Gap closure is in log-perplexity, from the sliding-window-only baseline toward the original: "
        "(ln P_window − ln P_model) / (ln P_window − ln P_original)"
        + ("; the second pair of closure columns takes the window + attention-sinks baseline as P_window."
           if "window_sinks" in evals else "."), "",
        table, "",
    ]
    if evals.get("long_context"):
        parts += long_context_section(evals["long_context"], LONG_CONTEXT_ROWS)
    if mse_before:
        mean_b = sum(mse_before) / len(mse_before)
        parts += ["## Attention transfer", "",
                  f"Mean held-out attention MSE (over layers, without the ×1000 loss scale): before {mean_b:.4g}"]
        if mse_after:
            mean_a = sum(mse_after) / len(mse_after)
            ratio = mean_b / mean_a if mean_a > 0 else math.inf
            parts[-1] += f", after {mean_a:.4g} — **{ratio:.1f}× lower**."
        parts += ["", "![per-layer attention MSE](attention_mse.png)", "",
                  "| layer | MSE before | MSE after |", "|---:|---:|---:|"]
        for i, b in enumerate(mse_before):
            a = f"{mse_after[i]:.4g}" if mse_after else ""
            parts.append(f"| {i} | {b:.4g} | {a} |")
        parts.append("")
    if info.get("layer_choice"):
        parts += layer_choice_section(info["layer_choice"])
    parts += ["## Training", "", "| stage | trainable parameters | optimizer steps | tokens | wall time |",
              "|---|---:|---:|---:|---:|"]
    for name, s in info["stages"].items():
        parts.append(f"| {name} | {s['trainable']:,} | {s['steps']} | {s['tokens']:,} | {_fmt_seconds(s['seconds'])} |")
    parts.append("")
    if info.get("samples"):
        parts += ["## Sample generations (greedy, final model)", ""]
        for prompt, text in info["samples"]:
            parts += [f"**{prompt}**{text}", ""]
    atomic_write_text(path, "\n".join(parts))
    return table


def machine(threads: int) -> str:
    """'x86_64, 2 threads, <CPU model name>': where a benchmark's figures were measured."""
    name = platform.processor() or "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            name = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), name)
    except OSError:
        pass
    return f"{platform.machine()}, {threads} threads, {name}"
