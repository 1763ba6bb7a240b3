"""Evaluation: lm-eval adapter (``harness``), local ``spear_*`` tasks (``tasks/``), sliding-window
perplexity (``perplexity``), retention and domain-gain preservation (``retention``), tables."""

from spear.evaluation.harness import evaluate_model
from spear.evaluation.perplexity import corpus_nll, corpus_nll_from_ids, tokenize_corpus
from spear.evaluation.retention import compute_retention, gain_preservation, retention, retention_from_suite

__all__ = [
    "compute_retention",
    "corpus_nll",
    "corpus_nll_from_ids",
    "evaluate_model",
    "gain_preservation",
    "retention",
    "retention_from_suite",
    "tokenize_corpus",
]
