"""Dinomaly, unified (multi-class) setting: one model for all classes of a dataset.

    python train_uni.py --data_path ../mvtec_anomaly_detection
    python train_uni.py --config configs/visa_uni.yaml --data_path ../VisA_pytorch/1cls
    python train_uni.py --total_iters 200 --encoder dinov2reg_vit_small_14 --device cpu   # any key

Every key of the YAML config can be overridden as --key value. A run writes, under
<output_dir>/<run_name>/: config.yaml, log.txt, results.csv / results.md (the per-class table),
results_per_defect.csv, and checkpoint.pth (trainable weights + config, for evaluate.py/predict.py).
"""
import argparse
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from datasets import (DatasetLayoutError, TestSet, TrainSet, build_test_set, build_train_set, check_files,
                      dataset_classes)
from datasets.sampler import StepBatchSampler
from models import Dinomaly, build_from_config
from utils.checkpoint import (CheckpointError, capture_rng, load_checkpoint, load_trainable, restore_rng,
                              save_checkpoint)
from utils.config import (SCHEMA, ConfigError, build_parser, collect_overrides, config_from_args, dump, load_yaml,
                          parse_known, validate)
from utils.evaluation import EvaluationResult, evaluate, format_markdown, write_tables
from utils.guard import TrainingGuard
from utils.loss import global_cosine_hm, hard_mining_p
from utils.optim import StableAdamW, lr_at, warmup_cosine_schedule
from utils.run import RunLog, StopRequest, create_run_dir, default_run_name, resolve_device, seed_everything

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


def train_step(model: Dinomaly, optimizer: torch.optim.Optimizer, images: torch.Tensor, it: int, lr: float,
               cfg: dict) -> tuple[float, bool]:
    """One optimisation step of the recipe at iteration `it`. Returns the loss and whether loss and
    gradients were finite; a non-finite step changes no weight."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    en, de = model(images)
    loss = global_cosine_hm(en, de, hard_mining_p(it, cfg["hm_p_final"], cfg["hm_ramp_iters"]), cfg["hm_factor"])
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(model.trainable_parameters(), max_norm=cfg["grad_clip"])
    finite = bool(torch.isfinite(loss) & torch.isfinite(grad_norm))
    if finite:
        optimizer.step()
    return loss.item(), finite


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
    results = checkpoint["results"]
    return TrainState(checkpoint["step"], checkpoint["reshuffles"],
                      EvaluationResult(results, checkpoint["defects"], 0, 0.0) if results else None,
                      list(checkpoint["losses"]))


def rollback(path: Path, model: Dinomaly, optimizer: StableAdamW, state: TrainState, log: RunLog) -> TrainState:
    """Back to the last checkpoint, with a fresh data order from there (the same one would fail again)."""
    if not path.is_file():
        raise TrainingDiverged(f"training went wrong at step {state.step} before the first checkpoint in {path}; "
                               f"try a lower lr, attn_eps > 0, or another seed")
    restored = restore_training(load_checkpoint(path), model, optimizer)
    restored.reshuffles = max(restored.reshuffles, state.reshuffles) + 1
    log(f"rolled back to step {restored.step} ({path}); data order reshuffled ({restored.reshuffles})")
    return restored


def train_loader(train_set: TrainSet, cfg: dict, state: TrainState, device: torch.device) -> DataLoader:
    """Batches of steps state.step..total_iters-1; its own generator keeps the global RNG untouched."""
    class_ids = [i for _, i in train_set.samples] if cfg["sampler"] == "class_balanced" else None
    sampler = StepBatchSampler(len(train_set), cfg["batch_size"], cfg["total_iters"],
                               cfg["seed"] + 1000 * state.reshuffles, start_step=state.step, class_ids=class_ids)
    return DataLoader(train_set, batch_sampler=sampler, num_workers=cfg["num_workers"],
                      pin_memory=device.type == "cuda", generator=torch.Generator())


def train(cfg: dict, train_set: TrainSet, test_sets: dict[str, TestSet], run_dir: Path, log: RunLog,
          device: torch.device, resume: Optional[dict] = None) -> EvaluationResult:
    """Train one model on `train_set` (from scratch, or from the checkpoint `resume`), evaluating on
    `test_sets` every `eval_every` steps and at the end. run_dir/checkpoint.pth is rewritten every
    `ckpt_every` steps, on SIGTERM/SIGINT, and at the end (then slimmed to weights, config, results)."""
    seed_everything(cfg["seed"])
    model = build_from_config(cfg).to(device)
    optimizer = build_optimizer(model, cfg)
    path, classes, total = run_dir / "checkpoint.pth", list(test_sets), cfg["total_iters"]
    state = TrainState()
    if resume is not None:
        state = restore_training(resume, model, optimizer)
        log(f"resumed from {resume['path']} at step {state.step}")
    schedule = warmup_cosine_schedule(cfg["lr"], cfg["final_lr"], total, cfg["warmup_iters"])
    guard = TrainingGuard(cfg["max_bad_steps"], cfg["spike_factor"])
    progress = tqdm(total=total, initial=state.step, desc="train", dynamic_ncols=True)

    model.train()
    with StopRequest() as stop:
        while state.step < total:
            for images, indices in train_loader(train_set, cfg, state, device):
                lr = lr_at(schedule, state.step, cfg["final_lr"])
                loss, finite = train_step(model, optimizer, images.to(device, non_blocking=True), state.step, lr, cfg)
                verdict = guard.check(loss, finite)
                if verdict != "ok":
                    files = ", ".join(train_set.samples[i][0].name for i in indices.tolist())
                    log(f"step {state.step + 1}: {verdict} (loss {loss:.4g}, update "
                        f"{'applied' if finite else 'skipped'}); batch: {files}")
                if verdict == "diverged" or (verdict == "spike" and cfg["spike_rollback"]):
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
                    log(f"step {state.step}: evaluating")
                    state.results = evaluate(model, test_sets, cfg, device, log)
                    model.train()
                if stop.signal is not None or (cfg["ckpt_every"] and state.step % cfg["ckpt_every"] == 0):
                    save_training(path, model, optimizer, state, cfg, classes)
                if stop.signal is not None:
                    log(f"signal {stop.signal}: checkpoint saved at step {state.step} in {path}; "
                        f"continue with --resume {run_dir.parent if run_dir.name in classes else run_dir}")
                    raise SystemExit(128 + stop.signal)
    progress.close()
    log(f"step {state.step}: evaluating")
    state.results = evaluate(model, test_sets, cfg, device, log)
    save_training(path, model, optimizer, state, cfg, classes, finished=True)
    return state.results


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
    if args.resume:
        run_dir = Path(args.resume)
        log = RunLog(run_dir)
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
    if checkpoint is None or not checkpoint["finished"]:
        return None
    return EvaluationResult(checkpoint["results"], checkpoint["defects"], 0, 0.0)


def main(argv: list[str]) -> None:
    cfg, args = parse_run_args(argv, "mvtec_uni.yaml", __doc__)
    device = resolve_device(cfg["device"])
    train_set, test_sets = load_data(cfg, dataset_classes(cfg))
    run_dir, log = open_run(cfg, args, device)
    log_counts(log, train_set, test_sets)
    checkpoint = previous_checkpoint(run_dir / "checkpoint.pth") if args.resume else None
    result = finished_result(checkpoint) or train(cfg, train_set, test_sets, run_dir, log, device, checkpoint)
    write_tables(run_dir, result)
    log("\n" + format_markdown(result.rows))
    log(f"results written to {run_dir}")


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except USER_ERRORS as error:
        sys.exit(f"error: {error}")
