"""Batched condition extractors. Importing the package registers the built-in annotators."""

from annotators.base import Annotator, WeightsSpec, available, create, register
from annotators import canny, hed, lineart, midas, mlsd, normalbae, openpose, shuffle  # noqa: F401  (registers)

__all__ = ["Annotator", "WeightsSpec", "available", "create", "register"]
