"""Batched condition extractors. ``create(name)`` imports a built-in annotator's module on first use."""

from annotators.base import Annotator, WeightsSpec, available, create, register

__all__ = ["Annotator", "WeightsSpec", "available", "create", "register"]
