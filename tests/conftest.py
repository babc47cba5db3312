"""Fixtures shared by the test files."""

import contextlib

import pytest

import bsr.train.loop as loop_mod


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
