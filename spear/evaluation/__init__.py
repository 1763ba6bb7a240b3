"""Evaluation: lm-eval adapter (``harness``), local ``spear_*`` tasks (``tasks/``), the NLL proxies
(``proxy``, over ``perplexity``'s sliding windows), retention and domain-gain preservation
(``retention``), tables, and the evaluate stage (``stage``)."""
