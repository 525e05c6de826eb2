"""Batched condition extractors. ``create(name)`` imports a built-in annotator's module on first use."""

from annotators.base import Annotator, WeightsSpec, annotator_class, available, create, from_spec, register

__all__ = ["Annotator", "WeightsSpec", "annotator_class", "available", "create", "from_spec", "register"]
