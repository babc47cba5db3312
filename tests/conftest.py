"""Fixtures shared by the test files."""

import contextlib

import pytest
import torch

import bsr.train.loop as loop_mod


def images_for(model, batch: int = 3):
    """A seeded batch of random images of the model's input size."""
    torch.manual_seed(1)
    return torch.randn(batch, 3, *model.patch_embed.img_size)


def logits_and_grads(model, x):
    """The logits of `x` and every parameter's gradient of sum(logits**2)."""
    out = model(x)
    model.zero_grad(set_to_none=True)
    out.square().sum().backward()
    return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


class Killed(Exception):
    """Stands in for SIGKILL: the run stops between two steps, after its last checkpoint."""


@pytest.fixture
def killed_at_step(monkeypatch):
    """`with killed_at_step(s): train(...)`: the run stops when it reaches step `s` (asserted), as a kill between two
    steps would; training runs normally again after the block."""

    @contextlib.contextmanager
    def killed(step: int):
        real_lr_at = loop_mod.lr_at

        def lr_at_then_kill(s, **kw):
            if s == step:
                raise Killed
            return real_lr_at(s, **kw)

        monkeypatch.setattr(loop_mod, "lr_at", lr_at_then_kill)
        try:
            with pytest.raises(Killed):
                yield
        finally:
            monkeypatch.setattr(loop_mod, "lr_at", real_lr_at)

    return killed
