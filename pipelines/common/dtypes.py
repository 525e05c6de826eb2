"""The one map from precision names in configs ("fp32", "bf16", "fp16") to torch dtypes."""

from __future__ import annotations

from typing import Literal

Precision = Literal["fp32", "bf16", "fp16"]


def torch_dtype(name: str):
    """``"bf16"`` -> ``torch.bfloat16``; a clear error for anything else."""
    import torch  # the foundation stays importable without torch (canny-only annotate actors)

    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    if name not in dtypes:
        raise ValueError(f"unknown precision {name!r}; expected one of {', '.join(dtypes)}")
    return dtypes[name]
