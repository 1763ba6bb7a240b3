"""Restoration by per-layer merging (SPEC §1.5): kernels, policies, in-memory and streaming merges.

Light at import time (torch is imported inside the functions that need it).
"""

from spear.merging.kernels import KERNELS, merge_tensor
from spear.merging.policies import POLICIES, Ranking, TMap, build_tmap, load_ranking

__all__ = ["KERNELS", "POLICIES", "Ranking", "TMap", "build_tmap", "load_ranking", "merge_tensor"]
