"""Watching each training step: non-finite losses or gradients, and loss spikes."""
import statistics
from collections import deque


class TrainingGuard:
    """Classifies each step as 'ok', 'bad' (non-finite: the update was skipped), 'diverged' (too many
    bad steps in a row: roll back) or 'spike' (loss above `spike_factor` x the running median)."""

    def __init__(self, max_bad_steps: int, spike_factor: float, window: int = 100, min_history: int = 20):
        self.max_bad_steps = max_bad_steps
        self.spike_factor = spike_factor
        self.recent = deque(maxlen=window)
        self.min_history = min_history
        self.bad_in_a_row = 0

    def check(self, loss: float, finite: bool) -> str:
        if not finite:
            self.bad_in_a_row += 1
            return "diverged" if self.bad_in_a_row >= self.max_bad_steps else "bad"
        self.bad_in_a_row = 0
        spike = (self.spike_factor > 0 and len(self.recent) >= self.min_history
                 and loss > self.spike_factor * statistics.median(self.recent))
        self.recent.append(loss)
        return "spike" if spike else "ok"

    def reset(self) -> None:
        self.recent.clear()
        self.bad_in_a_row = 0
