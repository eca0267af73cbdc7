"""Where and in which precision the model runs."""
import os
import platform
import resource
import time
from pathlib import Path
from typing import Callable

import torch

from .config import ConfigError


def resolve_device(name: str) -> torch.device:
    """'auto' picks cuda when available, else cpu; anything else must be a device torch knows."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"unknown device '{name}'; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device '{name}' requested but CUDA is not available; use --device cpu")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ConfigError(f"device '{name}' does not exist: this machine has {torch.cuda.device_count()} GPU(s)")
    return device


def compute_dtype(precision: str) -> torch.dtype:
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def autocast(device: torch.device, precision: str):
    """Mixed precision for the encoder and decoder; fp32 (the recipe) disables it."""
    if precision == "fp16" and device.type != "cuda":
        raise ConfigError("precision fp16 needs a CUDA device; use bf16 on CPU")
    return torch.autocast(device.type, dtype=compute_dtype(precision), enabled=precision != "fp32")


def add_scoring_precision_flag(parser) -> None:
    """predict.py's and evaluate.py's --precision: how this scoring runs, whatever precision trained the model."""
    parser.add_argument("--precision", choices=("fp32", "bf16", "fp16"), default="fp32",
                        help="fp32 (default) computes what training's evaluation computed; bf16 (a GPU, or a CPU with "
                             "native bf16; elsewhere fp32 with a note) or fp16 (CUDA) runs encoder and decoder under "
                             "autocast: faster, and maps and scores move slightly (README: Scoring in bf16)")


def store_weights_for_autocast(model: torch.nn.Module, precision: str) -> torch.nn.Module:
    """For scoring only: the weights and biases of every Linear and Conv2d stored once in the autocast
    dtype of `precision`, instead of autocast copying them at every call (it keeps a cast only of weights
    that train). The stored cast is the same rounding, so the maps are bit-identical to plain autocast's
    (tests/test_evaluate_predict.py); the model then runs only under autocast of that dtype."""
    if precision != "fp32":
        for module in model.modules():
            if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)):
                module.to(compute_dtype(precision))
    return model


def cpu_bf16_native() -> bool:
    """Whether this CPU computes bf16 in hardware (AVX-512 BF16 or AMX). Without it PyTorch emulates
    bf16 and a step is about 20x slower than fp32. Read from /proc/cpuinfo; elsewhere a short probe."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        flags = set(cpuinfo.read_text().split())
        return bool(flags & {"avx512_bf16", "amx_bf16"})
    return _bf16_probe_seconds(torch.bfloat16) < 2 * _bf16_probe_seconds(torch.float32)


def _bf16_probe_seconds(dtype: torch.dtype) -> float:
    a = torch.randn(512, 512).to(dtype)
    start = time.perf_counter()
    for _ in range(5):
        a @ a
    return time.perf_counter() - start


def cpu_description() -> str:
    """What the CPU offers torch, printed beside every CPU timing."""
    return (f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
            f"torch kernels {torch.backends.cpu.get_cpu_capability()}, "
            f"bf16 {'native' if cpu_bf16_native() else 'emulated'}")


def effective_precision(cfg: dict, device: torch.device, note: Callable[[str], None]) -> str:
    """The precision a run uses: bf16 on a CPU that only emulates it becomes fp32 (with a note), since
    an option sold as a speed-up must not slow the run down 20x, unless allow_emulated_bf16 is set. fp16
    off CUDA is a mistake."""
    if cfg["precision"] == "fp16" and device.type != "cuda":
        raise ConfigError("precision fp16 needs a CUDA device; use bf16 on CPU")
    if (cfg["precision"] == "bf16" and device.type == "cpu" and not cfg["allow_emulated_bf16"]
            and not cpu_bf16_native()):
        note("note: this CPU has no native bf16 (no avx512_bf16/amx_bf16): bf16 would be emulated, about 20x "
             "slower than fp32, so this run uses fp32; pass --allow_emulated_bf16 true to insist")
        return "fp32"
    return cfg["precision"]


def peak_memory_mib(device: torch.device) -> float:
    """Peak GPU memory allocated by torch, or on CPU the process's peak resident size."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
