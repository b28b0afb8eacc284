"""Process-wide state a run must restore to resume exactly: RNGs; and graceful stop on signals."""

from __future__ import annotations

import contextlib
import random
import signal
import threading

import numpy as np
import torch


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict:
    """Python, NumPy, torch and CUDA RNG states, as tensors and plain values (loadable with weights_only)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(_as_tuple(state["python"]))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _as_tuple(x):
    return tuple(_as_tuple(v) for v in x) if isinstance(x, (list, tuple)) else x


class Stopped(BaseException):
    """A stop signal arrived inside `StopSignals.interruptible()`: the sampling there is cut short. A
    BaseException, like KeyboardInterrupt, so that no `except Exception` on the way swallows it."""


class StopSignals:
    """While active, SIGTERM and SIGINT only set `requested` (the signal's name).

    The loop then finishes its step, writes a checkpoint and returns. Inside `interruptible()` (sampling for
    evaluation and grids: work that can be dropped) the signal also raises `Stopped` there, so the stop does
    not wait for the whole evaluation. The first signal puts the previous handlers back, so a second Ctrl-C
    stops at once. Outside the main thread (where handlers cannot be set) it does nothing.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.requested: str | None = None
        self._old: dict = {}
        self._interruptible = 0

    def _handle(self, signum, frame) -> None:
        self.requested = signal.Signals(signum).name
        self._restore()
        if self._interruptible:
            raise Stopped(self.requested)

    def _restore(self) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)
        self._old = {}

    @contextlib.contextmanager
    def interruptible(self):
        """A block that a stop signal cuts short with `Stopped` (raised at once when one came before)."""
        if self.requested:
            raise Stopped(self.requested)
        self._interruptible += 1
        try:
            yield
        finally:
            self._interruptible -= 1

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            self._old = {sig: signal.signal(sig, self._handle) for sig in self.SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        self._restore()
