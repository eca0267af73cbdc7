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
from pathlib import Path

import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from datasets import DatasetLayoutError, TestSet, TrainSet, build_test_set, build_train_set, dataset_classes
from datasets.sampler import StepBatchSampler
from models import Dinomaly, build_from_config
from utils.checkpoint import save_checkpoint
from utils.config import ConfigError, dump, parse_args
from utils.evaluation import EvaluationResult, evaluate, format_markdown, write_tables
from utils.loss import global_cosine_hm, hard_mining_p
from utils.optim import StableAdamW, lr_at, warmup_cosine_schedule
from utils.run import RunLog, create_run_dir, default_run_name, resolve_device, seed_everything

LOG_EVERY = 100  # steps between loss lines in log.txt
USER_ERRORS = (ConfigError, DatasetLayoutError, FileExistsError, FileNotFoundError)


def load_data(cfg: dict, class_names: list[str]) -> tuple[TrainSet, dict[str, TestSet]]:
    """Training images of all `class_names` and one test set per class; the whole layout is checked here,
    before any run directory or model exists."""
    return build_train_set(cfg, class_names), {name: build_test_set(cfg, name) for name in class_names}


def log_counts(log: RunLog, train_set: TrainSet, test_sets: dict[str, TestSet]) -> None:
    train_counts = Counter(train_set.class_names[i] for _, i in train_set.samples)
    for name, test_set in test_sets.items():
        labels = Counter(s.label for s in test_set.samples)
        log(f"  {name:<14} train {train_counts[name]:5d}   test normal {labels[0]:4d}  anomalous {labels[1]:4d}")


def train_step(model: Dinomaly, optimizer: torch.optim.Optimizer, images: torch.Tensor, it: int, lr: float,
               cfg: dict) -> torch.Tensor:
    """One optimisation step of the recipe at iteration `it`; returns the loss."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    en, de = model(images)
    loss = global_cosine_hm(en, de, hard_mining_p(it, cfg["hm_p_final"], cfg["hm_ramp_iters"]), cfg["hm_factor"])
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.trainable_parameters(), max_norm=cfg["grad_clip"])
    optimizer.step()
    return loss


def build_optimizer(model: Dinomaly, cfg: dict) -> StableAdamW:
    return StableAdamW(model.trainable_parameters(), lr=cfg["lr"], betas=cfg["betas"], eps=cfg["eps"],
                       weight_decay=cfg["weight_decay"], amsgrad=True)


def train(cfg: dict, train_set: TrainSet, test_sets: dict[str, TestSet], run_dir: Path, log: RunLog,
          device: torch.device) -> EvaluationResult:
    """Train one model on `train_set`, evaluating on `test_sets` every `eval_every` steps and at the end;
    save the trainable weights with the config and the results into run_dir/checkpoint.pth."""
    seed_everything(cfg["seed"])
    model = build_from_config(cfg).to(device)
    optimizer = build_optimizer(model, cfg)
    schedule = warmup_cosine_schedule(cfg["lr"], cfg["final_lr"], cfg["total_iters"], cfg["warmup_iters"])
    class_ids = [i for _, i in train_set.samples] if cfg["sampler"] == "class_balanced" else None
    sampler = StepBatchSampler(len(train_set), cfg["batch_size"], cfg["total_iters"], cfg["seed"], class_ids=class_ids)
    loader = DataLoader(train_set, batch_sampler=sampler, num_workers=cfg["num_workers"],
                        pin_memory=device.type == "cuda", persistent_workers=cfg["num_workers"] > 0,
                        generator=torch.Generator())

    model.train()
    losses, result = [], None
    progress = tqdm(loader, total=len(sampler), desc="train", dynamic_ncols=True)
    for it, (images, _) in enumerate(progress):
        lr = lr_at(schedule, it, cfg["final_lr"])
        loss = train_step(model, optimizer, images.to(device, non_blocking=True), it, lr, cfg)
        losses.append(loss.item())
        progress.set_postfix(loss=f"{losses[-1]:.4f}", lr=f"{lr:.2e}")
        step = it + 1
        if step % LOG_EVERY == 0 or step == cfg["total_iters"]:
            recent = losses[-LOG_EVERY:]
            log(f"step {step}/{cfg['total_iters']}  loss {sum(recent) / len(recent):.4f}  lr {lr:.3e}")
        if step == cfg["total_iters"] or (cfg["eval_every"] and step % cfg["eval_every"] == 0):
            log(f"step {step}: evaluating")
            result = evaluate(model, test_sets, cfg, device, log)
            model.train()

    save_checkpoint(run_dir / "checkpoint.pth", {
        "config": cfg, "model": model.trainable_state_dict(), "step": cfg["total_iters"],
        "classes": list(test_sets), "results": result.rows,
    })
    return result


def parse_run_args(argv: list[str], default_config: str, description: str) -> tuple[dict, argparse.Namespace]:
    cfg, args = parse_args(argv, str(Path(__file__).parent / "configs" / default_config), description,
                           extra=[("--overwrite", dict(action="store_true", help="replace an existing run_dir"))])
    cfg["run_name"] = cfg["run_name"] or default_run_name(args.config)
    return cfg, args


def open_run(cfg: dict, args: argparse.Namespace, device: torch.device) -> tuple[Path, RunLog]:
    """Create the run directory, save the resolved config there and start its log."""
    run_dir = create_run_dir(cfg["output_dir"], cfg["run_name"], args.overwrite)
    log = RunLog(run_dir)
    (run_dir / "config.yaml").write_text(dump(cfg))
    log(f"config ({args.config} + command line):\n{dump(cfg)}")
    log(f"run directory: {run_dir}   device: {device}")
    return run_dir, log


def main(argv: list[str]) -> None:
    cfg, args = parse_run_args(argv, "mvtec_uni.yaml", __doc__)
    device = resolve_device(cfg["device"])
    train_set, test_sets = load_data(cfg, dataset_classes(cfg))
    run_dir, log = open_run(cfg, args, device)
    log_counts(log, train_set, test_sets)
    result = train(cfg, train_set, test_sets, run_dir, log, device)
    write_tables(run_dir, result)
    log("\n" + format_markdown(result.rows))
    log(f"results written to {run_dir}")


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except USER_ERRORS as error:
        sys.exit(f"error: {error}")
