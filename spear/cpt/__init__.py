"""Continual pretraining: the LightningModule, freeze masks, strategies, HF export.

``spear.cpt.freeze`` is pure Python (no torch import); the other modules import torch/Lightning.
"""
