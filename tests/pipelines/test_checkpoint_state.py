"""The world-size-free training state: gathered from one DeepSpeed engine, scattered into a fresh one, the
next optimizer step is the same as if training had never stopped (in-process, one rank, no Ray)."""

from __future__ import annotations

import os
import socket

import pytest
import torch

from pipelines.checkpoint import MOMENTS, full_value, init_optimizer_state, inner_optimizer, set_full_value


@pytest.fixture(scope="module")
def process_group():
    import torch.distributed as dist

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", LOCAL_RANK="0", WORLD_SIZE="1")
    dist.init_process_group("gloo", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def engine_for(stage: int, precision: str):
    import deepspeed

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 3))
    model[0].bias.requires_grad_(False)  # a frozen parameter, as the locked UNet
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-2, weight_decay=1e-2)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / 4))
    engine, *_ = deepspeed.initialize(
        model=model,
        optimizer=optimizer,
        lr_scheduler=scheduler,
        config={
            "train_micro_batch_size_per_gpu": 4,
            "zero_optimization": {"stage": stage},
            "bf16": {"enabled": precision == "bf16"},
            "steps_per_print": 10**12,
        },
    )
    return engine


def step(engine, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(4, 5, generator=generator).to(engine.device, engine.module[0].weight.dtype)
    loss = engine(x).float().pow(2).mean()
    engine.backward(loss)
    engine.step()


def state_of(engine) -> dict[str, torch.Tensor]:
    optimizer, out = inner_optimizer(engine), {}
    for name, param in engine.module.named_parameters():
        if param.requires_grad:
            out[name] = full_value(param, optimizer).detach().float().clone()
            out.update({f"{k}.{name}": full_value(param, optimizer, k).detach().float().clone() for k in MOMENTS})
    return out


@pytest.mark.parametrize("stage,precision", [(0, "fp32"), (2, "fp32"), (2, "bf16"), (3, "fp32")])
def test_restored_state_continues_exactly(process_group, stage, precision):
    trained = engine_for(stage, precision)
    for seed in range(3):
        step(trained, seed)
    saved = state_of(trained)

    resumed = engine_for(stage, precision)  # fresh weights, no optimizer state yet
    init_optimizer_state(resumed, step=3)
    optimizer = inner_optimizer(resumed)
    for name, param in resumed.module.named_parameters():
        if param.requires_grad:
            set_full_value(param, optimizer, saved[name])
            for key in MOMENTS:
                set_full_value(param, optimizer, saved[f"{key}.{name}"], key)
    resumed.lr_scheduler.load_state_dict(trained.lr_scheduler.state_dict())
    for group, lr in zip(resumed.lr_scheduler.optimizer.param_groups, resumed.lr_scheduler.get_last_lr()):
        group["lr"] = lr
    assert state_of(resumed).keys() == saved.keys()
    assert all(torch.equal(v, saved[k]) for k, v in state_of(resumed).items())

    step(trained, 3)
    step(resumed, 3)
    after, expected = state_of(resumed), state_of(trained)
    assert all(torch.equal(after[k], expected[k]) for k in expected), [
        k for k in expected if not torch.equal(after[k], expected[k])
    ]
