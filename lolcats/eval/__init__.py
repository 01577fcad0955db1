"""Evaluation: perplexity by position, few-shot MMLU, passkey retrieval, the lm-eval adapter, and their CLI."""
