"""Seconds per training step of the recipe, on random images (no data loading), for any config.

    python benchmarks/train_speed.py --encoder dinov2_vit_small_14 \
        --encoder_weights ../shared/weights/dinov2_vits14_imgfocus.pth \
        --image_size 256 --crop_size 224 --batch_size 8 --device cpu

Accepts every config key as --key value (see configs/mvtec_uni.yaml) plus --steps and --warmup_steps.
Prints seconds/step, images/s and peak memory.
"""
import resource
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models import build_from_config  # noqa: E402
from train_uni import build_optimizer, train_step  # noqa: E402
from utils.config import parse_args  # noqa: E402
from utils.run import resolve_device, seed_everything  # noqa: E402


def peak_memory_mib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main(argv: list[str]) -> None:
    cfg, args = parse_args(argv, str(Path(__file__).resolve().parents[1] / "configs" / "mvtec_uni.yaml"), __doc__,
                           extra=[("--steps", dict(type=int, default=10)),
                                  ("--warmup_steps", dict(type=int, default=2))])
    device = resolve_device(cfg["device"])
    seed_everything(cfg["seed"])
    model = build_from_config(cfg).to(device).train()
    optimizer = build_optimizer(model, cfg)
    images = torch.randn(cfg["batch_size"], 3, cfg["crop_size"], cfg["crop_size"], device=device)
    times = []
    for it in range(args.warmup_steps + args.steps):
        start = time.perf_counter()
        train_step(model, optimizer, images, it + 1000, cfg["lr"], cfg)  # past the ramp: p = 0.9
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    per_step = sorted(times[args.warmup_steps:])[len(times[args.warmup_steps:]) // 2]
    print(f"encoder {cfg['encoder']}  crop {cfg['crop_size']}  batch {cfg['batch_size']}  device {device} "
          f"({torch.get_num_threads()} threads)")
    print(f"median over {args.steps} steps: {per_step:.3f} s/step   {cfg['batch_size'] / per_step:.1f} images/s   "
          f"peak memory {peak_memory_mib(device):.0f} MiB")


if __name__ == "__main__":
    main(sys.argv[1:])
