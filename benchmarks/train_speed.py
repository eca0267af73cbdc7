"""Training speed of the recipe's computation against the fast options, side by side.

    python benchmarks/train_speed.py --encoder dinov2_vit_small_14 \
        --encoder_weights ../shared/weights/dinov2_vits14_imgfocus.pth \
        --image_size 256 --crop_size 224 --batch_size 8 --device cpu

Each mode runs in its own process (so peak memory is its own) on random images, without data
loading, and reports the median seconds per step after warm-up, in wall time and in CPU time (all
threads; on a machine shared with other jobs the CPU time is the steadier figure to compare):
  recipe     fp32, eager, the encoder runs at every step (the reference's computation)
  fp32+cache fp32 with cached encoder features (--cache_features): the step runs bottleneck and decoder only
  bf16       bf16 autocast for encoder and decoder
  fast       bf16 + cached encoder features
  fast+compile  the same with torch.compile (only with --with_compile; compiling takes minutes)
Accepts every config key as --key value (see configs/base.yaml); `--grad_checkpoint true` measures the
modes with the decoder recomputed in the backward pass (README "Memory for large encoders"). Every result names the CPU's
capability: on a CPU without native bf16 (no AVX-512 BF16 / AMX) the bf16 modes are emulated and slow,
which is why training falls back to fp32 there (see allow_emulated_bf16).
"""
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from models import build_model  # noqa: E402
from train_uni import build_optimizer, train_step  # noqa: E402
from utils.config import parse_args  # noqa: E402
from utils.device import autocast, cpu_description, peak_memory_mib, resolve_device  # noqa: E402
from utils.rng import seed_everything  # noqa: E402

MODES = {"recipe": dict(precision="fp32", compile=False, cached=False),
         "fp32+cache": dict(precision="fp32", compile=False, cached=True),
         "bf16": dict(precision="bf16", compile=False, cached=False),
         "fast": dict(precision="bf16", compile=False, cached=True),
         "fast+compile": dict(precision="bf16", compile=True, cached=True)}



def measure(cfg: dict, mode: str, steps: int, warmup: int) -> dict:
    """Seconds per step of one mode, in this process."""
    options = MODES[mode]
    cfg = {**cfg, "precision": options["precision"]}
    device = resolve_device(cfg["device"])
    seed_everything(cfg["seed"])
    model = build_model(cfg).to(device).train()
    if options["compile"]:
        for block in [*model.encoder.blocks, *model.decoder]:
            block.compile()
    optimizer = build_optimizer(model, cfg)
    inputs = torch.randn(cfg["batch_size"], 3, cfg["crop_size"], cfg["crop_size"], device=device)
    if options["cached"]:
        with autocast(device, cfg["precision"]):
            inputs = model.encode(inputs)  # what the feature cache hands to every later step
    times, cpu_times = [], []
    for it in range(warmup + steps):
        start, cpu_start = time.perf_counter(), time.process_time()
        train_step(model, optimizer, inputs, it + 1000, [g["lr"] for g in optimizer.param_groups], cfg)  # past the ramp: p = 0.9
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
        cpu_times.append(time.process_time() - cpu_start)
    per_step, cpu_per_step = sorted(times[warmup:])[steps // 2], sorted(cpu_times[warmup:])[steps // 2]
    return {"mode": mode, "s_per_step": per_step, "cpu_s_per_step": cpu_per_step, "peak_mib": peak_memory_mib(device),
            "device": str(device), "threads": torch.get_num_threads(), "cpu": cpu_description()}


def main(argv: list[str]) -> None:
    extra = [("--steps", dict(type=int, default=10)), ("--warmup_steps", dict(type=int, default=2)),
             ("--with_compile", dict(action="store_true")), ("--only_mode", dict(choices=list(MODES)))]
    cfg, args = parse_args(argv, str(ROOT / "configs" / "mvtec_uni.yaml"), __doc__, extra=extra)
    if args.only_mode:
        print("RESULT " + json.dumps(measure(cfg, args.only_mode, args.steps, args.warmup_steps)), flush=True)
        return
    modes = [m for m in MODES if m != "fast+compile" or args.with_compile]
    results = []
    for mode in modes:
        child = subprocess.run([sys.executable, __file__, *argv, "--only_mode", mode], capture_output=True, text=True)
        line = next((l for l in child.stdout.splitlines() if l.startswith("RESULT ")), None)
        if line is None:
            sys.exit(f"mode {mode} failed:\n{child.stderr[-3000:]}")
        results.append(json.loads(line[len("RESULT "):]))
    recipe = results[0]
    print(f"encoder {cfg['encoder']}  crop {cfg['crop_size']}  batch {cfg['batch_size']}  device {recipe['device']} "
          f"({recipe['threads']} threads), median of {args.steps} steps")
    print(f"cpu: {cpu_description()}")
    print(f"{'mode':<14}{'s/step':>9}{'cpu s/step':>11}{'images/s':>10}{'peak MiB':>10}{'speed-up':>10}{'memory':>8}")
    for r in results:
        print(f"{r['mode']:<14}{r['s_per_step']:>9.3f}{r['cpu_s_per_step']:>11.3f}"
              f"{cfg['batch_size'] / r['s_per_step']:>10.1f}{r['peak_mib']:>10.0f}"
              f"{recipe['s_per_step'] / r['s_per_step']:>9.2f}x{r['peak_mib'] / recipe['peak_mib']:>7.0%}")


if __name__ == "__main__":
    main(sys.argv[1:])
