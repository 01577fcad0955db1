"""Evaluation: perplexity (and, later, MMLU and the lm-eval adapter)."""
