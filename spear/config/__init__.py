"""Typed configuration: the schema (defaults, types, ranges, help), Hydra registration, validation."""

from spear.config.store import compose, register, resolved_yaml, save_run_config, validate

__all__ = ["compose", "register", "resolved_yaml", "save_run_config", "validate"]
