"""Zero convolutions and the generic ControlNet block (arXiv 2302.05543, Eq. 2).

    y_c = F(x; Θ) + Z(F(x + Z(c; Θz1); Θc); Θz2)

F(·; Θ) is the original block, locked. F(·; Θc) is a trainable deep copy. Z is a 1x1 convolution
whose weight and bias start at zero, so at step 0 both Z terms vanish and y_c == y exactly (Eq. 3-4):
training starts from the production model and adds no noise. Z still learns: ∂Z/∂W is its input,
which is non-zero, so the first step moves W off zero (Eq. 6-8), after which gradients reach Θc.
"""

from __future__ import annotations

import copy

import torch
from torch import nn


class ZeroConv2d(nn.Conv2d):
    """1x1 convolution with weight and bias initialised to exactly zero."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__(in_channels, out_channels, kernel_size=1)
        nn.init.zeros_(self.weight)
        nn.init.zeros_(self.bias)


class ZeroLinear(nn.Linear):
    """The same 1x1 convolution for token layouts (N, L, C): a per-token linear map, zero-initialised."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__(in_features, out_features)
        nn.init.zeros_(self.weight)
        nn.init.zeros_(self.bias)


def zero_conv(in_channels: int, out_channels: int, tokens: bool = False) -> nn.Module:
    return ZeroLinear(in_channels, out_channels) if tokens else ZeroConv2d(in_channels, out_channels)


def lock(module: nn.Module) -> nn.Module:
    """Freeze a module: no gradients, and eval-mode behaviour (BN statistics, dropout) forever."""
    module.requires_grad_(False)
    module.eval()
    module.train = _stay_in_eval.__get__(module)  # model.train() on a parent must not flip it back
    return module


def _stay_in_eval(self: nn.Module, mode: bool = True) -> nn.Module:
    return nn.Module.train(self, False)


class ControlledBlock(nn.Module):
    """Wrap ANY block ``F`` (conv, resnet, transformer...) with a trainable copy and two zero convs.

    Args:
        block: the original block. It is locked in place (requires_grad False, eval mode).
        in_channels: channels of the block's input x (the first zero conv maps c to this).
        out_channels: channels of the block's output y.
        cond_channels: channels of the condition c; c must have x's spatial/token shape.
        tokens: True for channel-last token inputs (N, L, C) such as transformer blocks.
    """

    def __init__(
        self, block: nn.Module, in_channels: int, out_channels: int, cond_channels: int, tokens: bool = False
    ):
        super().__init__()
        self.trainable_copy = copy.deepcopy(block)  # copied before locking: Θc starts equal to Θ
        self.trainable_copy.requires_grad_(True)
        self.trainable_copy.train()
        self.locked = lock(block)
        self.zero_in = zero_conv(cond_channels, in_channels, tokens)
        self.zero_out = zero_conv(out_channels, out_channels, tokens)
        self.tokens = tokens

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        # Everything but the channel dimension must agree: (N, ., H, W) or (N, L, .).
        same_layout = (
            c.shape[:-1] == x.shape[:-1] if self.tokens else (c.shape[0], *c.shape[2:]) == (x.shape[0], *x.shape[2:])
        )
        if c.dim() != x.dim() or not same_layout:
            raise ValueError(
                f"condition shape {tuple(c.shape)} does not match input shape {tuple(x.shape)} "
                f"(batch and {'token' if self.tokens else 'spatial'} dimensions must agree)"
            )
        y = self.locked(x)
        return y + self.zero_out(self.trainable_copy(x + self.zero_in(c)))

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]
