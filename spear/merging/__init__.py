"""Restoration by per-layer merging (SPEC §1.5): policies (ranking -> ``TMap``), the merge plan
(``TMap`` -> each tensor's step), kernels (the math), and its two sinks: the streaming writer and
the in-memory merger. Light at import time (torch is imported inside the functions that need it)."""
