"""Stopping on SIGTERM/SIGINT between two steps, on every process at once, so a preempted job loses nothing."""
import signal

import torch

from .distributed import mean_over_ranks, world_size


class StopRequest:
    """While active, SIGTERM and SIGINT only set `signal`; the training loop checks it after each step,
    saves a checkpoint and exits."""

    def __init__(self):
        self.signal = None
        self._previous = {}

    def _handle(self, signum, frame) -> None:
        self.signal = signum

    def __enter__(self) -> "StopRequest":
        for signum in (signal.SIGTERM, signal.SIGINT):
            self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)

    def requested(self) -> bool:
        """True on every process as soon as any of them received SIGTERM/SIGINT."""
        if world_size() > 1:
            return bool(mean_over_ranks(torch.tensor(float(self.signal is not None))) > 0)
        return self.signal is not None

    @property
    def exit_code(self) -> int:
        return 128 + (self.signal or signal.SIGTERM)
