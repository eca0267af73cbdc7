"""Dinomaly, unified (multi-class) setting: one model for all classes of a dataset.

    python train_uni.py --data_path ../mvtec_anomaly_detection
    python train_uni.py --config configs/visa_uni.yaml --data_path ../VisA_pytorch/1cls
    python train_uni.py --total_iters 200 --encoder dinov2reg_vit_small_14 --device cpu   # any key
    python train_uni.py --resume runs/mvtec_uni_20260101_120000                          # continue a run
    torchrun --nproc_per_node=4 train_uni.py --data_path ../mvtec_anomaly_detection      # several GPUs

Every key of configs/base.yaml can be overridden as --key value. A run writes, under
<output_dir>/<run_name>/: config.yaml, log.txt, results.csv / results.md (the per-class table),
results_per_defect.csv, and checkpoint.pth (trainable weights + config, for evaluate.py/predict.py).

This file is the training loop: config, data, model, optimizer, the step, evaluation, saving.
Checkpoints and rollback live in utils/checkpoint.py, the run's set-up in utils/run_setup.py.
"""
import math
import re
import time
import shutil
import sys
from pathlib import Path
from typing import Optional

import torch
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from datasets import DatasetLayoutError, TestSet, TrainSet, class_folder, count_lines, dataset_classes
from datasets.caches import FeatureCache, attach_image_cache
from datasets.fewshot import SHOT_LIST, write_shot_list
from datasets.sampler import StepBatchSampler
from models import Dinomaly, build_model
from utils.checkpoint import (TrainState, finished_result, previous_checkpoint, restore_training, rollback,
                              save_training)
from utils.curves import Curves
from utils.device import autocast
from utils.distributed import barrier, is_main, mean_over_ranks, rank, world_size
from utils.evaluation import EvaluationResult, evaluate, paper_per_class
from utils.guard import TrainingGuard
from utils.loss import global_cosine_hm, hard_mining_p
from utils.optim import GroupSchedule, StableAdamW
from utils.rng import seed_everything, seed_this_rank
from utils.run_setup import RunLog, finish, load_run_data, open_run, run_cli, start
from utils.signals import StopRequest

LOG_EVERY = 100  # steps between loss lines in log.txt


def base_learning_rates(cfg: dict) -> list[float]:
    """The base rate of each parameter group: `lr`, or with bottleneck_first_lr first that one (the
    two-stage bottleneck's first layer), then `lr` for everything else."""
    return [cfg["lr"]] if cfg["bottleneck_first_lr"] is None else [cfg["bottleneck_first_lr"], cfg["lr"]]


def build_optimizer(model: Dinomaly, cfg: dict) -> StableAdamW:
    """The parameter groups of base_learning_rates; their rates are set at every step (GroupSchedule)."""
    groups = [{"params": model.trainable_parameters()}]
    if cfg["bottleneck_first_lr"] is not None:
        first = list(model.bottleneck.reduce.parameters())
        rest = [p for p in model.trainable_parameters() if all(p is not q for q in first)]
        groups = [{"params": first, "lr": cfg["bottleneck_first_lr"]}, {"params": rest}]
    return StableAdamW(groups, lr=cfg["lr"], betas=cfg["betas"], eps=cfg["eps"], weight_decay=cfg["weight_decay"],
                       amsgrad=cfg["amsgrad"])


def train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, inputs, it: int, lrs: list[float],
               cfg: dict, scaler: Optional[torch.amp.GradScaler] = None) -> tuple[float, bool, float]:
    """One optimisation step of the recipe at iteration `it` on images (or their cached encoder
    features), each parameter group at its rate of `lrs`. Returns the loss (averaged over processes),
    whether loss and gradients were finite (a non-finite step changes no weight) and the gradient norm
    before clipping."""
    for group, lr in zip(optimizer.param_groups, lrs, strict=True):
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
    return loss, finite, float(grad_norm)


def train_loader(data: Dataset, class_ids: Optional[list[int]], cfg: dict, state: TrainState,
                 device: torch.device, modalities: int = 1) -> DataLoader:
    """This process's share of the batches of steps state.step..total_iters-1 (class-balanced when
    `class_ids` is given; `modalities` images per object drawn together, TrainSet's order); its own
    generator keeps the global RNG untouched, and reads that draw random numbers (augmentation, MANTA-Tiny
    views) draw them from (seed, step), whatever the workers."""
    sampler = StepBatchSampler(len(data), cfg["batch_size"], cfg["total_iters"], cfg["seed"] + 1000 * state.reshuffles,
                               start_step=state.step, class_ids=class_ids, rank=rank(), world_size=world_size(),
                               modalities=modalities, draws=isinstance(data, TrainSet) and data.random_reads)
    workers = 0 if isinstance(data, FeatureCache) else cfg["num_workers"]
    return DataLoader(data, batch_sampler=sampler, num_workers=workers, pin_memory=device.type == "cuda",
                      generator=torch.Generator())


def to_device(inputs, device: torch.device):
    if isinstance(inputs, torch.Tensor):
        return inputs.to(device, non_blocking=True)
    fused, groups = inputs
    return fused.to(device, non_blocking=True), [g.to(device, non_blocking=True) for g in groups]


def evaluate_on_main(model: Dinomaly, test_sets: dict[str, TestSet], cfg: dict, device: torch.device,
                     log: RunLog, curves: Curves, step: int) -> Optional[EvaluationResult]:
    """Rank 0 evaluates (results identical to a single process) while the others wait."""
    result = None
    if is_main():
        log(f"step {step}: evaluating")
        result = evaluate(model, test_sets, cfg, device, log, on_class=curves.collect_panels)
        curves.log_eval(step, result.rows)
    barrier()
    model.train()
    return result


def evaluate_save_or_stop(model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: TrainState,
                          stop: StopRequest, test_sets: dict[str, TestSet], cfg: dict, device: torch.device,
                          log: RunLog, curves: Curves, path: Path) -> None:
    """What follows every step: an evaluation every `eval_every` steps (the last step's is training's final
    one), the checkpoint at `path` every `ckpt_every` steps or on a signal, and after a signal the exit."""
    if cfg["eval_every"] and state.step % cfg["eval_every"] == 0 and state.step < cfg["total_iters"]:
        state.results = evaluate_on_main(model, test_sets, cfg, device, log, curves, state.step)
    stopping = stop.requested()
    classes = list(test_sets)
    if stopping or (cfg["ckpt_every"] and state.step % cfg["ckpt_every"] == 0):
        save_training(path, model, optimizer, state, cfg, classes)
    if stopping:
        log(f"signal {stop.signal or 'on another rank'}: checkpoint saved at step {state.step} in {path}; "
            f"continue with --resume {run_root(path.parent, classes)}")
        raise SystemExit(stop.exit_code)


def must_roll_back(guard: TrainingGuard, loss: float, finite: bool, indices: torch.Tensor, train_set: TrainSet,
                   state: TrainState, cfg: dict, log: RunLog) -> bool:
    """The guard's verdict on the step just taken, logged with the files of its batch when it is not "ok";
    True when the run goes back to its last checkpoint (diverged, or a spike with spike_rollback)."""
    verdict = guard.check(loss, finite)
    if verdict != "ok":
        files = ", ".join(train_set.samples[i][0].name for i in indices.tolist())
        log(f"step {state.step + 1}: {verdict} (loss {loss:.4g}, update "
            f"{'applied' if finite else 'skipped'}); batch: {files}")
    return verdict == "diverged" or (verdict == "spike" and cfg["spike_rollback"])


def roll_back(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: TrainState, log: RunLog,
              curves: Curves, guard: TrainingGuard, progress: tqdm) -> TrainState:
    """The state of the last checkpoint at `path`, with the curves cut there, a fresh guard and the
    progress bar moved back."""
    state = rollback(path, model, optimizer, state, log)
    curves.restart_at(state.step)
    guard.reset()
    progress.n = state.step
    return state


def train(cfg: dict, train_set: TrainSet, test_sets: dict[str, TestSet], run_dir: Path, log: RunLog,
          device: torch.device, resume: Optional[dict] = None) -> EvaluationResult:
    """Train one model on `train_set` (from scratch, or from the checkpoint `resume`), evaluating on
    `test_sets` every `eval_every` steps and at the end. run_dir/checkpoint.pth is rewritten every
    `ckpt_every` steps, on SIGTERM/SIGINT, and at the end (then slimmed to weights, config, results).
    Under torchrun every process runs this; only rank 0 evaluates and writes."""
    seed_everything(cfg["seed"])
    model = build_model(cfg).to(device)
    optimizer = build_optimizer(model, cfg)
    seed_this_rank(cfg["seed"], rank())  # each process its own dropout noise; rank 0 keeps the seed's stream
    path, classes, total = run_dir / "checkpoint.pth", list(test_sets), cfg["total_iters"]
    state = TrainState()
    if resume is not None:
        state = restore_training(resume, model, optimizer, log)
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
    schedule = GroupSchedule(cfg, base_learning_rates(cfg))
    guard = TrainingGuard(cfg["max_bad_steps"], cfg["spike_factor"])
    progress = tqdm(total=total, initial=state.step, desc="train", dynamic_ncols=True, disable=not is_main())
    curves = Curves(run_dir, state.step, enabled=is_main(), cfg=cfg)  # and the trackers of cfg['logger']
    tick = time.perf_counter()

    model.train()
    try:
        with StopRequest() as stop, curves:
            while state.step < total:
                for inputs, indices in train_loader(data, class_ids, cfg, state, device, train_set.modalities):
                    lrs = schedule(state.step)
                    lr = lrs[-1]  # the decoder's, logged
                    easy_share = hard_mining_p(state.step, cfg["hm_p_final"], cfg["hm_ramp_iters"])
                    loss, finite, grad_norm = train_step(net, optimizer, to_device(inputs, device), state.step, lrs,
                                                         cfg, scaler)
                    if must_roll_back(guard, loss, finite, indices, train_set, state, cfg, log):
                        state = roll_back(path, model, optimizer, state, log, curves, guard, progress)
                        break
                    state.step += 1
                    state.losses.append(loss)
                    now = time.perf_counter()
                    seconds, tick = now - tick, now
                    curves.log_step(state.step, loss, lr, grad_norm, easy_share, seconds, cfg["batch_size"])
                    progress.update()
                    progress.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}")
                    if state.step % LOG_EVERY == 0:
                        recent = state.losses[-LOG_EVERY:]
                        log(f"step {state.step}/{total}  loss {sum(recent) / len(recent):.4f}  lr {lr:.3e}")
                        curves.plot()
                    evaluate_save_or_stop(model, optimizer, state, stop, test_sets, cfg, device, log, curves, path)
    except DatasetLayoutError as error:  # an image changed since the check; processes cannot agree on a save
        if world_size() == 1:
            save_training(path, model, optimizer, state, cfg, classes)
        raise unreadable_image(error, state.step if world_size() == 1 else None, run_root(run_dir, classes)) from None
    finally:  # whatever ends the loop (an error, a signal): what is printed next starts on a line of its own
        progress.close()
    state.results = evaluate_on_main(model, test_sets, cfg, device, log, curves, state.step)
    save_training(path, model, optimizer, state, cfg, classes, finished=True)
    curves.plot_final(state.results.rows if state.results else None)
    curves.close()
    if isinstance(data, FeatureCache):
        shutil.rmtree(run_dir / "feature_cache", ignore_errors=True)
    return state.results


def unreadable_image(error: DatasetLayoutError, saved_step: Optional[int], resume_dir: Path) -> DatasetLayoutError:
    """One line naming the file that could not be read mid-run (data-loader workers add a traceback)."""
    reason = re.sub(r"^[\w.]+Error: ", "", str(error).strip().splitlines()[-1])
    saved = f"checkpoint saved at step {saved_step}" if saved_step is not None else "the last checkpoint is kept"
    return DatasetLayoutError(f"{reason}; {saved}: fix the file, then continue with --resume {resume_dir}")


def run_root(run_dir: Path, classes: list[str]) -> Path:
    """The directory to --resume: the run's, also when `run_dir` is one class's folder of train_sep.py."""
    return run_dir.parent if run_dir.name in map(class_folder, classes) else run_dir


def save_shot_list(cfg: dict, run_dir: Path, images: dict[str, list[Path]], log: RunLog) -> None:
    """A few-shot run writes the training images it drew (reuse them with --shot_list)."""
    if (cfg["shots"] or cfg["shot_list"]) and is_main():
        write_shot_list(run_dir / SHOT_LIST, images)
        log(f"few-shot: {sum(map(len, images.values()))} training images, listed in {run_dir / SHOT_LIST}")


def cache_dir(cfg: dict) -> Path:
    return Path(cfg["cache_dir"] or Path(cfg["output_dir"]) / "cache")


def main(argv: list[str]) -> None:
    cfg, args, device, notes = start(argv, "mvtec_uni.yaml", __doc__)
    [(train_set, test_sets)] = load_run_data(cfg, [dataset_classes(cfg)])
    run_dir, log = open_run(cfg, args, device, notes)
    save_shot_list(cfg, run_dir, train_set.images_by_class(), log)
    barrier()
    for line in count_lines(train_set, test_sets):
        log(line)
    checkpoint = previous_checkpoint(run_dir / "checkpoint.pth") if args.resume else None
    result = finished_result(checkpoint) or train(cfg, train_set, test_sets, run_dir, log, device, checkpoint)
    finish(run_dir, result, log, paper_per_class(cfg["dataset"]))  # the paper's table is multi-class


if __name__ == "__main__":
    sys.exit(run_cli(main, sys.argv[1:]))
