"""ADViT (zsgyj1996/ADViT, the released VT-ADL model) as a baseline on this repository's protocol: one model
per class, as the released `python train.py -p hazelnut`, scored by the same 7 metrics as Dinomaly.

    python train_advit.py --data_path ../mvtec_anomaly_detection --classes hazelnut
    python train_advit.py --config configs/advit/mvtec_advit_discrepancy.yaml --data_path ../mvtec_anomaly_detection
    python train_advit.py --resume runs/mvtec_advit_hazelnut_20260101_120000

Every key of configs/advit/base.yaml (ADViT's own and Dinomaly's) can be overridden as --key value. The
released schedule is 400 epochs of Adam: each class trains epochs x (its images // batch_size) steps
(`--epochs 0` trains total_iters steps instead). As released, the weights of the epoch with the lowest
mean training loss are kept (`select: best_train_loss`); they are what the evaluation at the end scores
and what <class>/checkpoint.pth holds (`select: last` scores the last weights). The run directory is
laid out as train_sep.py's. One process; no mixed precision, compilation or caches.
"""
import math
import sys
import time
from pathlib import Path
from typing import Optional

import torch
from tqdm import tqdm

from datasets import TestSet, TrainSet, dataset_classes, load_data
from models.advit import CAPSULE_DIM, ADViT, advit_loss, association_losses, decoder_output_size
from train_sep import train_classes
from train_uni import LOG_EVERY, evaluate_on_main, evaluate_save_or_stop, must_roll_back, roll_back, train_loader
from utils.checkpoint import (TrainState, load_checkpoint, load_trainable, restore_training,
                              save_checkpoint, save_training)
from utils.config import ConfigError, settings_keys
from utils.curves import Curves
from utils.distributed import world_size
from utils.evaluation import EvaluationResult
from utils.guard import TrainingGuard
from utils.rng import seed_everything
from utils.run_setup import CONFIGS, RunLog, finish, open_run, run_cli, start
from utils.signals import StopRequest

SETTINGS = CONFIGS / "advit" / "base.yaml"
CHOICES = {"association": ("none", "discrepancy"), "select": ("best_train_loss", "last")}
POSITIVE = ("patch_size", "vit_dim", "vit_depth", "vit_heads", "vit_mlp", "mdn_gaussians", "association_temperature")
NON_NEGATIVE = ("noise_sd", "mse_weight", "ssim_weight", "epochs", "association_k")
RECIPE_ONLY = {"precision": "fp32", "compile": False, "image_cache": "none", "cache_features": "none",
               "train_augment": "none", "sampler": "uniform"}


def advit_keys():
    """ADViT's keys valid (and its values the defaults) while inside; see utils.config.settings_keys."""
    return settings_keys(SETTINGS, CHOICES)


def check_settings(cfg: dict) -> None:
    """What the ADViT network needs of a config, as one-line errors naming the key."""
    for key in POSITIVE:
        if cfg[key] <= 0:
            raise ConfigError(f"'{key}' must be > 0, got {cfg[key]}")
    for key in NON_NEGATIVE:
        if cfg[key] < 0:
            raise ConfigError(f"'{key}' must be >= 0, got {cfg[key]}")
    for key, value in RECIPE_ONLY.items():
        if cfg[key] != value:
            raise ConfigError(f"'{key}' {cfg[key]!r} is not supported by train_advit.py (only {value!r})")
    if world_size() > 1:
        raise ConfigError("train_advit.py runs in one process; start it without torchrun")
    if cfg["crop_size"] % cfg["patch_size"]:
        raise ConfigError(f"crop_size {cfg['crop_size']} must be a multiple of patch_size {cfg['patch_size']}")
    if cfg["vit_dim"] % cfg["vit_heads"] or cfg["vit_dim"] % CAPSULE_DIM:
        raise ConfigError(f"vit_dim {cfg['vit_dim']} must be a multiple of vit_heads ({cfg['vit_heads']}) and of "
                          f"the capsule size {CAPSULE_DIM}")
    layers = cfg["decoder_layers"]
    if not layers or any(len(layer) != 4 for layer in layers) or layers[-1][0] != 3:
        raise ConfigError(f"decoder_layers must be [out_channels, kernel, stride, padding] lists ending in 3 "
                          f"channels, got {layers}")
    if decoder_output_size(layers) != cfg["crop_size"]:
        raise ConfigError(f"decoder_layers make {decoder_output_size(layers)} x {decoder_output_size(layers)} "
                          f"images from the 8 x 8 capsule, not crop_size {cfg['crop_size']}")


def steps_per_epoch(cfg: dict, images: int) -> int:
    """Batches of one epoch: our sampler drops each epoch's last incomplete batch (the released loader kept it)."""
    return max(1, images // cfg["batch_size"])


def class_config(cfg: dict, images: int) -> dict:
    """The config of one class: with `epochs`, total_iters becomes epochs x steps_per_epoch."""
    return {**cfg, "total_iters": cfg["epochs"] * steps_per_epoch(cfg, images)} if cfg["epochs"] else cfg


def build_optimizer(model: ADViT, cfg: dict) -> torch.optim.Adam:
    return torch.optim.Adam(model.parameters(), lr=cfg["lr"], betas=cfg["betas"], eps=cfg["eps"],
                            weight_decay=cfg["weight_decay"])


def train_step(model: ADViT, optimizer: torch.optim.Optimizer, images: torch.Tensor, cfg: dict
               ) -> tuple[float, bool, float]:
    """One Adam step on train.py's loss; with the association discrepancy, solver.py's minimax: its
    loss1 = loss - k series_loss and loss2 = loss + k prior_loss each back-propagated, their gradients
    added (here one backward of loss1 + loss2: the same sum). Returns ADViT's loss (what the best epoch is
    chosen by), whether loss and gradients were finite (else nothing changes), the gradient norm."""
    loss, associations = advit_loss(model, images, cfg)
    total = loss
    if associations:
        series_loss, prior_loss = association_losses(associations)
        k = cfg["association_k"]
        total = (loss - k * series_loss) + (loss + k * prior_loss)
    optimizer.zero_grad(set_to_none=True)
    total.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=math.inf)  # the norm only: no clipping
    finite = math.isfinite(loss.item()) and bool(torch.isfinite(grad_norm))
    if finite:
        optimizer.step()
    return loss.item(), finite, float(grad_norm)


def epoch_means(losses: list[float], per_epoch: int) -> list[float]:
    return [sum(losses[i:i + per_epoch]) / per_epoch for i in range(0, len(losses) - per_epoch + 1, per_epoch)]


def best_epoch(losses: list[float], per_epoch: int) -> Optional[int]:
    """The 0-based epoch of lowest mean loss, the later one on a tie (train.py: `<= minloss`)."""
    means = epoch_means(losses, per_epoch)
    finite = [m for m in means if math.isfinite(m)]
    return max(i for i, m in enumerate(means) if finite and m == min(finite)) if finite else None


def keep_if_best(model: ADViT, path: Path, state: TrainState, per_epoch: int, cfg: dict) -> None:
    """At an epoch's end, the weights go to `path` when its mean loss is the lowest so far. A resumed run
    replays the same steps and rewrites the same file, so it is consistent with the checkpoint."""
    if best_epoch(state.losses, per_epoch) == state.step // per_epoch - 1:
        save_checkpoint(path, {"config": cfg, "model": model.trainable_state_dict(), "step": state.step})


def load_best(model: ADViT, path: Path, state: TrainState, per_epoch: int, log: RunLog) -> None:
    """Put the best epoch's weights into `model` (train.py keeps only those); the last weights stay when
    that epoch's file is not at hand (no finished epoch, or a rollback replaced the epoch)."""
    epoch = best_epoch(state.losses, per_epoch)
    saved = load_checkpoint(path, log) if path.is_file() else None
    if epoch is None or saved is None or saved["step"] != (epoch + 1) * per_epoch:
        log("note: the best epoch's weights are not at hand; evaluating the last weights")
        return
    load_trainable(model, saved["model"], f"best-epoch weights {path}")
    log(f"kept the weights of epoch {epoch + 1}/{state.step // per_epoch}, the lowest mean training loss "
        f"({epoch_means(state.losses, per_epoch)[epoch]:.4f}), as the released train.py")


def train(cfg: dict, train_set: TrainSet, test_sets: dict[str, TestSet], run_dir: Path, log: RunLog,
          device: torch.device, resume: Optional[dict] = None) -> EvaluationResult:
    """Train one ADViT on one class, from scratch or from the checkpoint `resume`; the loop of
    train_uni.train with ADViT's model, loss and optimizer, and the best-epoch selection."""
    cfg = class_config(cfg, len(train_set.samples))
    per_epoch = steps_per_epoch(cfg, len(train_set.samples))
    seed_everything(cfg["seed"])
    model = ADViT(cfg).to(device)
    optimizer = build_optimizer(model, cfg)
    path, best_path, classes, total = run_dir / "checkpoint.pth", run_dir / "best.pth", list(test_sets), cfg["total_iters"]
    state = TrainState()
    if resume is not None:
        state = restore_training(resume, model, optimizer, log)
        log(f"resumed from {resume['path']} at step {state.step}")
    log(f"{total} steps ({per_epoch} per epoch), association {cfg['association']}")
    guard = TrainingGuard(cfg["max_bad_steps"], cfg["spike_factor"])
    progress = tqdm(total=total, initial=state.step, desc="train", dynamic_ncols=True)
    curves = Curves(run_dir, state.step)
    tick = time.perf_counter()
    model.train()
    with StopRequest() as stop:
        while state.step < total:
            for images, indices in train_loader(train_set, None, cfg, state, device):
                loss, finite, grad_norm = train_step(model, optimizer, images.to(device), cfg)
                if must_roll_back(guard, loss, finite, indices, train_set, state, cfg, log):
                    state = roll_back(path, model, optimizer, state, log, curves, guard, progress)
                    break
                state.step += 1
                state.losses.append(loss)
                now = time.perf_counter()
                seconds, tick = now - tick, now
                curves.log_step(state.step, loss, cfg["lr"], grad_norm, float("nan"), seconds, cfg["batch_size"])
                progress.update()
                progress.set_postfix(loss=f"{loss:.4f}")
                if state.step % LOG_EVERY == 0:
                    log(f"step {state.step}/{total}  loss {sum(state.losses[-LOG_EVERY:]) / LOG_EVERY:.4f}")
                    curves.plot()
                if cfg["select"] == "best_train_loss" and state.step % per_epoch == 0:
                    keep_if_best(model, best_path, state, per_epoch, cfg)
                evaluate_save_or_stop(model, optimizer, state, stop, test_sets, cfg, device, log, curves, path)
    progress.close()
    if cfg["select"] == "best_train_loss":
        load_best(model, best_path, state, per_epoch, log)
    state.results = evaluate_on_main(model, test_sets, cfg, device, log, curves, state.step)
    save_training(path, model, optimizer, state, cfg, classes, finished=True)
    best_path.unlink(missing_ok=True)
    curves.plot_final(state.results.rows)
    return state.results


def main(argv: list[str]) -> None:
    with advit_keys():
        cfg, args, device, notes = start(argv, "advit/mvtec_advit.yaml", __doc__)
        check_settings(cfg)
        data = {name: load_data(cfg, [name]) for name in dataset_classes(cfg)}
        run_dir, log = open_run(cfg, args, device, notes)
        finish(run_dir, train_classes(cfg, data, run_dir, log, device, bool(args.resume), train), log)


if __name__ == "__main__":
    sys.exit(run_cli(main, sys.argv[1:]))
