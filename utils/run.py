"""Run plumbing: device choice, seeding, the run directory and its log."""
import datetime
import os
import random
import resource
import shutil
import signal
from pathlib import Path

import numpy as np
import torch


def resolve_device(name: str) -> torch.device:
    """'auto' picks cuda when available, else cpu; anything else must be a device torch knows."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"unknown device '{name}'; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device '{name}' requested but CUDA is not available; use --device cpu")
    return device


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.cuda.manual_seed_all(seed)


def create_run_dir(output_dir: str, run_name: str, overwrite: bool = False) -> Path:
    """A fresh run directory; an existing one is only reused with `overwrite` (its content is removed)."""
    run_dir = Path(output_dir) / run_name
    if run_dir.exists():
        if not overwrite:
            raise FileExistsError(f"run directory {run_dir} already exists; choose another --run_name, "
                                  f"continue it with --resume {run_dir}, or pass --overwrite to replace it")
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True)
    return run_dir


def default_run_name(config_path: str) -> str:
    return f"{Path(config_path).stem}_{datetime.datetime.now():%Y%m%d_%H%M%S}"


class RunLog:
    """Prints a line and appends it to <run_dir>/log.txt (silent when not enabled: ranks other than 0)."""

    def __init__(self, run_dir: Path, enabled: bool = True):
        self.path = Path(run_dir) / "log.txt"
        self.enabled = enabled

    def __call__(self, message: str) -> None:
        if not self.enabled:
            return
        print(message, flush=True)
        with open(self.path, "a") as f:
            f.write(message + "\n")
            f.flush()
            os.fsync(f.fileno())


class StopRequest:
    """While active, SIGTERM and SIGINT only set `signal`; the training loop checks it after each step,
    saves a checkpoint and exits, so a preempted job loses nothing."""

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


def peak_memory_mib(device: torch.device) -> float:
    """Peak GPU memory allocated by torch, or on CPU the process's peak resident size."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def autocast(device: torch.device, precision: str):
    """Mixed precision for the encoder and decoder; fp32 (the recipe) disables it."""
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    if precision == "fp16" and device.type != "cuda":
        raise ValueError("precision fp16 needs a CUDA device; use bf16 on CPU")
    return torch.autocast(device.type, dtype=dtype, enabled=precision != "fp32")
