"""Eq. 2-8 of the ControlNet paper, checked on three very different blocks."""

import copy

import pytest
import torch
from torch import nn

from model.zero import ControlledBlock, ZeroConv2d, ZeroLinear


class ResnetBlock(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.norm1, self.conv1 = nn.GroupNorm(4, c), nn.Conv2d(c, c, 3, padding=1)
        self.norm2, self.conv2 = nn.GroupNorm(4, c), nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x):
        h = self.conv1(torch.relu(self.norm1(x)))
        return x + self.conv2(torch.relu(self.norm2(h)))


def conv_bn_relu(c_in: int, c_out: int) -> nn.Module:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.ReLU())


def transformer_block(d: int) -> nn.Module:
    return nn.TransformerEncoderLayer(d_model=d, nhead=4, dim_feedforward=2 * d, dropout=0.1, batch_first=True)


def _init_bn_stats(block: nn.Module) -> None:
    for m in block.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 1.5)


# (name, block factory, x shape, c shape, in_channels, out_channels, tokens)
CASES = [
    ("resnet", lambda: ResnetBlock(8), (2, 8, 16, 16), (2, 3, 16, 16), 8, 8, False),
    ("conv_bn_relu", lambda: conv_bn_relu(8, 16), (2, 8, 16, 16), (2, 3, 16, 16), 8, 16, False),
    ("transformer", lambda: transformer_block(16), (2, 10, 16), (2, 10, 5), 16, 16, True),
]
IDS = [c[0] for c in CASES]


def make(case, seed=0):
    name, factory, x_shape, c_shape, c_in, c_out, tokens = case
    torch.manual_seed(seed)
    block = factory()
    _init_bn_stats(block)
    reference = copy.deepcopy(block).eval()
    wrapped = ControlledBlock(block, c_in, c_out, cond_channels=c_shape[-1] if tokens else c_shape[1], tokens=tokens)
    return reference, wrapped, torch.randn(x_shape), torch.randn(c_shape)


def test_zero_convs_start_at_zero():
    for z in (ZeroConv2d(3, 8), ZeroLinear(3, 8)):
        assert torch.count_nonzero(z.weight) == 0 and torch.count_nonzero(z.bias) == 0


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_identity_at_init(case):
    """Eq. 3-4: at initialisation y_c == y exactly, for random inputs and conditions (train mode too)."""
    reference, wrapped, _, _ = make(case)
    wrapped.train()
    for seed in range(3):
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(make(case)[2].shape, generator=g)
        c = torch.randn(make(case)[3].shape, generator=g) * 10
        with torch.no_grad():
            assert torch.equal(wrapped(x, c), reference(x))


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_first_step_gradients(case):
    """Eq. 6-8: first backward gives the zero convs non-zero grads, the copy none; after one step both flow."""
    _, wrapped, x, c = make(case)
    opt = torch.optim.SGD(wrapped.trainable_parameters(), lr=0.1)
    target = torch.randn_like(wrapped(x, c))

    loss = ((wrapped(x, c) - target) ** 2).mean()
    loss.backward()
    assert wrapped.zero_out.weight.grad.abs().sum() > 0
    assert wrapped.zero_out.bias.grad.abs().sum() > 0
    # Z_in's output is multiplied through the copy and then by Z_out's zero weight: no gradient yet.
    for p in list(wrapped.trainable_copy.parameters()) + list(wrapped.zero_in.parameters()):
        assert p.grad is None or torch.count_nonzero(p.grad) == 0
    opt.step()
    opt.zero_grad()
    assert torch.count_nonzero(wrapped.zero_out.weight) > 0

    loss = ((wrapped(x, c) - target) ** 2).mean()
    loss.backward()
    copy_grads = [p.grad for p in wrapped.trainable_copy.parameters() if p.grad is not None]
    assert sum(float(g.abs().sum()) for g in copy_grads) > 0
    assert wrapped.zero_in.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_locked_block_never_changes(case):
    _, wrapped, x, c = make(case)
    before = {k: v.clone() for k, v in wrapped.locked.state_dict().items()}
    opt = torch.optim.Adam(wrapped.trainable_parameters(), lr=1e-2)
    wrapped.train()  # the parent's train() must not put the locked block back in training mode
    assert not wrapped.locked.training and wrapped.trainable_copy.training
    for _ in range(20):
        loss = wrapped(x, c).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = wrapped.locked.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # params AND BN running stats
    assert all(not p.requires_grad for p in wrapped.locked.parameters())
    assert not torch.equal(wrapped(x, c), make(case)[0](x))  # and the wrapper did learn something


def test_condition_shape_mismatch_is_a_clear_error():
    _, wrapped, x, _ = make(CASES[0])
    with pytest.raises(ValueError, match="condition shape"):
        wrapped(x, torch.randn(2, 3, 8, 8))
