"""spear-mm: continual pretraining with post-hoc, layer-wise restoration (SPEAR-MM).

Kept import-light on purpose: importing ``spear`` must not import torch, so that the CLI
and config tooling start fast. Heavy modules live in subpackages imported on demand.
"""

__version__ = "0.1.0"

from spear.errors import SpearError

__all__ = ["SpearError", "__version__"]
