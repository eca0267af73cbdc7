"""Dinomaly, unified (multi-class) setting: one model for all classes of a dataset.

    python train_uni.py --data_path ../mvtec_anomaly_detection
    python train_uni.py --config configs/visa_uni.yaml --data_path ../VisA_pytorch/1cls
    python train_uni.py --total_iters 200 --encoder dinov2reg_vit_small_14 --device cpu   # any key
    python train_uni.py --resume runs/mvtec_uni_20260101_120000                          # continue a run
    torchrun --nproc_per_node=4 train_uni.py --data_path ../mvtec_anomaly_detection      # several GPUs

Every key of the YAML config can be overridden as --key value. A run writes, under
<output_dir>/<run_name>/: config.yaml, log.txt, results.csv / results.md (the per-class table),
results_per_defect.csv, and checkpoint.pth (trainable weights + config, for evaluate.py/predict.py).
"""
import argparse
import math
import shutil
import signal
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from datasets import (DatasetLayoutError, TestSet, TrainSet, build_test_set, build_train_set, check_files,
                      dataset_classes)
from datasets.cache import attach_image_cache
from datasets.sampler import StepBatchSampler
from models import Dinomaly, build_from_config
from utils.checkpoint import (CheckpointError, capture_rng, load_checkpoint, load_trainable, restore_rng,
                              save_checkpoint)
from utils.config import (SCHEMA, ConfigError, build_parser, collect_overrides, config_from_args, dump, load_yaml,
                          parse_known, validate)
from utils.distributed import barrier, broadcast, init_distributed, is_main, mean_over_ranks, rank, shutdown, world_size
from utils.evaluation import EvaluationResult, evaluate, format_markdown, write_tables
from utils.feature_cache import FeatureCache
from utils.guard import TrainingGuard
from utils.loss import global_cosine_hm, hard_mining_p
from utils.optim import StableAdamW, lr_at, warmup_cosine_schedule
from utils.run import (RunLog, StopRequest, autocast, create_run_dir, default_run_name, resolve_device,
                       seed_everything)

LOG_EVERY = 100  # steps between loss lines in log.txt
RESUME_OVERRIDES = ("device", "num_workers", "data_path", "ckpt_every", "max_bad_steps", "spike_factor",
                    "spike_rollback")


class TrainingDiverged(RuntimeError):
    pass


USER_ERRORS = (CheckpointError, ConfigError, DatasetLayoutError, FileExistsError, FileNotFoundError, TrainingDiverged)


def load_data(cfg: dict, class_names: list[str]) -> tuple[TrainSet, dict[str, TestSet]]:
    """Training images of all `class_names` and one test set per class; the layout and every file header
    are checked here, before any run directory or model exists."""
    train_set = build_train_set(cfg, class_names)
    test_sets = {name: build_test_set(cfg, name) for name in class_names}
    check_files([path for path, _ in train_set.samples], [s for t in test_sets.values() for s in t.samples])
    return train_set, test_sets


def log_counts(log: RunLog, train_set: TrainSet, test_sets: dict[str, TestSet]) -> None:
    train_counts = Counter(train_set.class_names[i] for _, i in train_set.samples)
    for name, test_set in test_sets.items():
        labels = Counter(s.label for s in test_set.samples)
        log(f"  {name:<14} train {train_counts[name]:5d}   test normal {labels[0]:4d}  anomalous {labels[1]:4d}")


def train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, inputs, it: int, lr: float, cfg: dict,
               scaler: Optional[torch.amp.GradScaler] = None) -> tuple[float, bool]:
    """One optimisation step of the recipe at iteration `it` on images (or their cached encoder
    features). Returns the loss (averaged over processes) and whether loss and gradients were finite;
    a non-finite step changes no weight."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    with autocast(next(model.parameters()).device, cfg["precision"]):
        en, de = model(inputs)
    loss = global_cosine_hm(en, de, hard_mining_p(it, cfg["hm_p_final"], cfg["hm_ramp_iters"]), cfg["hm_factor"])
    optimizer.zero_grad(set_to_none=True)
    (scaler.scale(loss) if scaler else loss).backward()
    if scaler:
        scaler.unscale_(optimizer)
    params = [p for p in model.parameters() if p.requires_grad]
    grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm=cfg["grad_clip"])
    loss = mean_over_ranks(loss.detach()).item()
    finite = math.isfinite(loss) and (scaler is not None or bool(torch.isfinite(grad_norm)))
    if scaler:
        scaler.step(optimizer)  # skips the update itself when fp16 gradients overflowed
        scaler.update()
    elif finite:
        optimizer.step()
    return loss, finite


def build_optimizer(model: Dinomaly, cfg: dict) -> StableAdamW:
    return StableAdamW(model.trainable_parameters(), lr=cfg["lr"], betas=cfg["betas"], eps=cfg["eps"],
                       weight_decay=cfg["weight_decay"], amsgrad=True)


@dataclass
class TrainState:
    """Progress that a checkpoint must carry besides weights, optimizer and random states. The data
    order and the learning rate follow from `step` and `reshuffles`."""
    step: int = 0
    reshuffles: int = 0                    # rollbacks so far; each draws a new data order from there on
    results: Optional[EvaluationResult] = None
    losses: list[float] = field(default_factory=list)


def save_training(path: Path, model: Dinomaly, optimizer: StableAdamW, state: TrainState, cfg: dict,
                  classes: list[str], finished: bool = False) -> None:
    """A resumable checkpoint; the finished one keeps only what evaluation and prediction need."""
    payload = {"config": cfg, "model": model.trainable_state_dict(), "step": state.step, "classes": classes,
               "results": state.results.rows if state.results else None,
               "defects": state.results.defects if state.results else None,
               "reshuffles": state.reshuffles, "finished": finished}
    if not finished:
        payload.update(optimizer=optimizer.state_dict(), rng=capture_rng(), losses=state.losses)
    save_checkpoint(path, payload)


def restore_training(checkpoint: dict, model: Dinomaly, optimizer: StableAdamW) -> TrainState:
    load_trainable(model, checkpoint["model"], f"checkpoint {checkpoint['path']}")
    optimizer.load_state_dict(checkpoint["optimizer"])
    restore_rng(checkpoint["rng"])
    return TrainState(checkpoint["step"], checkpoint["reshuffles"], saved_results(checkpoint),
                      list(checkpoint["losses"]))


def saved_results(checkpoint: dict) -> Optional[EvaluationResult]:
    """The last evaluation stored in a checkpoint (None if it has none yet)."""
    if not checkpoint["results"]:
        return None
    return EvaluationResult(checkpoint["results"], checkpoint["defects"], images=0, seconds=0.0)


def rollback(path: Path, model: Dinomaly, optimizer: StableAdamW, state: TrainState, log: RunLog) -> TrainState:
    """Back to the last checkpoint, with a fresh data order from there (the same one would fail again)."""
    if not path.is_file():
        raise TrainingDiverged(f"training went wrong at step {state.step} before the first checkpoint in {path}; "
                               f"try a lower lr, attn_eps > 0, or another seed")
    restored = restore_training(load_checkpoint(path), model, optimizer)
    restored.reshuffles = max(restored.reshuffles, state.reshuffles) + 1
    log(f"rolled back to step {restored.step} ({path}); data order reshuffled ({restored.reshuffles})")
    return restored


def train_loader(data: Dataset, class_ids: Optional[list[int]], cfg: dict, state: TrainState,
                 device: torch.device) -> DataLoader:
    """This process's share of the batches of steps state.step..total_iters-1 (class-balanced when
    `class_ids` is given); its own generator keeps the global RNG untouched."""
    sampler = StepBatchSampler(len(data), cfg["batch_size"], cfg["total_iters"], cfg["seed"] + 1000 * state.reshuffles,
                               start_step=state.step, class_ids=class_ids, rank=rank(), world_size=world_size())
    workers = 0 if isinstance(data, FeatureCache) else cfg["num_workers"]
    return DataLoader(data, batch_sampler=sampler, num_workers=workers, pin_memory=device.type == "cuda",
                      generator=torch.Generator())


def to_device(inputs, device: torch.device):
    if isinstance(inputs, torch.Tensor):
        return inputs.to(device, non_blocking=True)
    fused, groups = inputs
    return fused.to(device, non_blocking=True), [g.to(device, non_blocking=True) for g in groups]


def train(cfg: dict, train_set: TrainSet, test_sets: dict[str, TestSet], run_dir: Path, log: RunLog,
          device: torch.device, resume: Optional[dict] = None) -> EvaluationResult:
    """Train one model on `train_set` (from scratch, or from the checkpoint `resume`), evaluating on
    `test_sets` every `eval_every` steps and at the end. run_dir/checkpoint.pth is rewritten every
    `ckpt_every` steps, on SIGTERM/SIGINT, and at the end (then slimmed to weights, config, results).
    Under torchrun every process runs this; only rank 0 evaluates and writes."""
    seed_everything(cfg["seed"])
    model = build_from_config(cfg).to(device)
    optimizer = build_optimizer(model, cfg)
    path, classes, total = run_dir / "checkpoint.pth", list(test_sets), cfg["total_iters"]
    state = TrainState()
    if resume is not None:
        state = restore_training(resume, model, optimizer)
        log(f"resumed from {resume['path']} at step {state.step}")
    if cfg["compile"]:
        for block in [*model.encoder.blocks, *model.decoder]:
            block.compile()
    data = train_set
    if cfg["image_cache"] != "none":
        attach_image_cache(train_set, cfg["image_cache"], cache_dir(cfg), cfg["image_size"], log)
    if cfg["cache_features"] != "none":
        data = FeatureCache(model, train_set, cfg, device, cfg["cache_features"], run_dir / "feature_cache", log)
    class_ids = [i for _, i in train_set.samples] if cfg["sampler"] == "class_balanced" else None
    net = DDP(model, device_ids=[device.index] if device.type == "cuda" else None) if world_size() > 1 else model
    scaler = torch.amp.GradScaler(device.type) if cfg["precision"] == "fp16" else None
    schedule = warmup_cosine_schedule(cfg["lr"], cfg["final_lr"], total, cfg["warmup_iters"])
    guard = TrainingGuard(cfg["max_bad_steps"], cfg["spike_factor"])
    progress = tqdm(total=total, initial=state.step, desc="train", dynamic_ncols=True, disable=not is_main())

    model.train()
    with StopRequest() as stop:
        while state.step < total:
            for inputs, indices in train_loader(data, class_ids, cfg, state, device):
                lr = lr_at(schedule, state.step, cfg["final_lr"])
                loss, finite = train_step(net, optimizer, to_device(inputs, device), state.step, lr, cfg, scaler)
                verdict = guard.check(loss, finite)
                if verdict != "ok":
                    files = ", ".join(train_set.samples[i][0].name for i in indices.tolist())
                    log(f"step {state.step + 1}: {verdict} (loss {loss:.4g}, update "
                        f"{'applied' if finite else 'skipped'}); batch: {files}")
                if verdict == "diverged" or (verdict == "spike" and cfg["spike_rollback"]):
                    barrier()
                    state = rollback(path, model, optimizer, state, log)
                    guard.reset()
                    progress.n = state.step
                    break
                state.step += 1
                state.losses.append(loss)
                progress.update()
                progress.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}")
                if state.step % LOG_EVERY == 0:
                    recent = state.losses[-LOG_EVERY:]
                    log(f"step {state.step}/{total}  loss {sum(recent) / len(recent):.4f}  lr {lr:.3e}")
                if cfg["eval_every"] and state.step % cfg["eval_every"] == 0 and state.step < total:
                    state.results = evaluate_on_main(model, test_sets, cfg, device, log, state.step)
                stopping = stop_requested(stop)
                if stopping or (cfg["ckpt_every"] and state.step % cfg["ckpt_every"] == 0):
                    save_on_main(path, model, optimizer, state, cfg, classes)
                if stopping:
                    log(f"signal {stop.signal or 'on another rank'}: checkpoint saved at step {state.step} in "
                        f"{path}; continue with --resume {run_dir.parent if run_dir.name in classes else run_dir}")
                    raise SystemExit(128 + (stop.signal or signal.SIGTERM))
    progress.close()
    state.results = evaluate_on_main(model, test_sets, cfg, device, log, state.step)
    save_on_main(path, model, optimizer, state, cfg, classes, finished=True)
    if isinstance(data, FeatureCache):
        shutil.rmtree(run_dir / "feature_cache", ignore_errors=True)
    return state.results


def stop_requested(stop: StopRequest) -> bool:
    """True on every process as soon as any of them received SIGTERM/SIGINT."""
    flag = torch.tensor(float(stop.signal is not None))
    return bool(mean_over_ranks(flag) > 0) if world_size() > 1 else stop.signal is not None


def evaluate_on_main(model: Dinomaly, test_sets: dict[str, TestSet], cfg: dict, device: torch.device,
                     log: RunLog, step: int) -> Optional[EvaluationResult]:
    """Rank 0 evaluates (results identical to a single process) while the others wait."""
    result = None
    if is_main():
        log(f"step {step}: evaluating")
        result = evaluate(model, test_sets, cfg, device, log)
    barrier()
    model.train()
    return result


def save_on_main(path: Path, *args, **kwargs) -> None:
    if is_main():
        save_training(path, *args, **kwargs)
    barrier()


def cache_dir(cfg: dict) -> Path:
    return Path(cfg["cache_dir"] or Path(cfg["output_dir"]) / "cache")


def parse_run_args(argv: list[str], default_config: str, description: str) -> tuple[dict, argparse.Namespace]:
    """The config and options of a new run, or, with --resume RUN_DIR, the run's own saved config."""
    parser = build_parser(str(Path(__file__).parent / "configs" / default_config), description, extra=[
        ("--overwrite", dict(action="store_true", help="replace an existing run directory")),
        ("--resume", dict(metavar="RUN_DIR", help="continue this run where it stopped"))])
    args = parse_known(parser, argv)
    if not args.resume:
        cfg = config_from_args(args)
        cfg["run_name"] = cfg["run_name"] or default_run_name(args.config)
        return cfg, args
    saved = Path(args.resume) / "config.yaml"
    if not saved.is_file():
        raise FileNotFoundError(f"cannot resume: {saved} not found (is {args.resume} a run directory?)")
    overrides = collect_overrides(args, SCHEMA)
    fixed = sorted(set(overrides) - set(RESUME_OVERRIDES))
    if fixed:
        raise ConfigError(f"--{fixed[0]} cannot change when resuming; only {', '.join(RESUME_OVERRIDES)} can")
    return validate({**load_yaml(saved), **overrides}, str(saved)), args


def open_run(cfg: dict, args: argparse.Namespace, device: torch.device) -> tuple[Path, RunLog]:
    """Create the run directory (or reopen it with --resume), save the resolved config, start the log."""
    if args.resume or not is_main():
        run_dir = Path(args.resume or Path(cfg["output_dir"]) / cfg["run_name"])
        log = RunLog(run_dir, enabled=is_main())
        log(f"resuming run {run_dir} on {device}")
        return run_dir, log
    run_dir = create_run_dir(cfg["output_dir"], cfg["run_name"], args.overwrite)
    log = RunLog(run_dir)
    (run_dir / "config.yaml").write_text(dump(cfg))
    log(f"config ({args.config} + command line):\n{dump(cfg)}")
    log(f"run directory: {run_dir}   device: {device}")
    return run_dir, log


def previous_checkpoint(path: Path) -> Optional[dict]:
    """The checkpoint a resumed run continues from (None: start this model from scratch)."""
    return load_checkpoint(path) if path.is_file() else None


def finished_result(checkpoint: Optional[dict]) -> Optional[EvaluationResult]:
    """The results of a model whose training already finished, else None."""
    return saved_results(checkpoint) if checkpoint is not None and checkpoint["finished"] else None


def start(argv: list[str], default_config: str, description: str) -> tuple[dict, argparse.Namespace, torch.device]:
    """Config, options and device of this process (under torchrun, every rank uses rank 0's run name)."""
    cfg, args = parse_run_args(argv, default_config, description)
    device = init_distributed(resolve_device(cfg["device"]))
    if cfg["precision"] == "fp16" and device.type != "cuda":
        raise ConfigError("precision fp16 needs a CUDA device; use bf16 on CPU")
    cfg["run_name"] = broadcast(cfg["run_name"])
    return cfg, args, device


def main(argv: list[str]) -> None:
    cfg, args, device = start(argv, "mvtec_uni.yaml", __doc__)
    train_set, test_sets = load_data(cfg, dataset_classes(cfg))
    run_dir, log = open_run(cfg, args, device)
    barrier()
    log_counts(log, train_set, test_sets)
    checkpoint = previous_checkpoint(run_dir / "checkpoint.pth") if args.resume else None
    result = finished_result(checkpoint) or train(cfg, train_set, test_sets, run_dir, log, device, checkpoint)
    finish(run_dir, result, log)


def finish(run_dir: Path, result: EvaluationResult, log: RunLog) -> None:
    """Rank 0 writes the tables and prints the per-class table; every process leaves the group."""
    if is_main():
        write_tables(run_dir, result)
        log("\n" + format_markdown(result.rows))
        log(f"results written to {run_dir}")
    shutdown()


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except USER_ERRORS as error:
        sys.exit(f"error: {error}")
