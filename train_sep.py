"""Dinomaly, class-separated setting: one model per class, trained in sequence with the same recipe.

    python train_sep.py --data_path ../mvtec_anomaly_detection
    python train_sep.py --config configs/visa_sep.yaml --data_path ../VisA_pytorch/1cls

The training loop is train_uni.train; only the outer loop over classes differs. `--resume RUN_DIR`
skips the finished classes and continues the interrupted one at its last checkpoint. A run writes, under
<output_dir>/<run_name>/: config.yaml, log.txt, <class>/checkpoint.pth for every class, and
results.csv / results.md with one row per class and the mean, plus results_per_defect.csv.
"""
import sys
from pathlib import Path
from typing import Callable

import torch

from datasets import class_folder, count_lines, dataset_classes
from train_uni import save_shot_list, train
from utils.checkpoint import finished_result, previous_checkpoint
from utils.distributed import barrier, is_main
from utils.evaluation import EvaluationResult, write_tables
from utils.run_setup import RunLog, finish, load_run_data, open_run, run_cli, start


def train_classes(cfg: dict, data: dict, run_dir: Path, log: RunLog, device: torch.device, resume: bool,
                  train_class: Callable = train) -> EvaluationResult:
    """Train one model per class of `data` in turn with `train_class` (train_uni.train, or another model's
    loop with its signature), skipping the classes a resumed run finished; the table after every class."""
    combined = EvaluationResult(rows={}, defects=[], images=0, seconds=0.0)
    for i, (name, (train_set, test_sets)) in enumerate(data.items()):
        class_dir = run_dir / class_folder(name)
        checkpoint = previous_checkpoint(class_dir / "checkpoint.pth") if resume else None
        result = finished_result(checkpoint)
        log(f"=== class {i + 1}/{len(data)}: {name}" + (" (finished earlier)" if result else ""))
        if result is None:
            for line in count_lines(train_set, test_sets):
                log(line)
            class_dir.mkdir(exist_ok=True)
            barrier()
            result = train_class(cfg, train_set, test_sets, class_dir, log, device, checkpoint)
        if is_main():
            combined.rows.update(result.rows)
            combined.defects += result.defects
            write_tables(run_dir, combined)  # the table so far, after every class
    return combined


def main(argv: list[str]) -> None:
    cfg, args, device, notes = start(argv, "mvtec_sep.yaml", __doc__)
    names = dataset_classes(cfg)
    data = dict(zip(names, load_run_data(cfg, [[name] for name in names])))
    run_dir, log = open_run(cfg, args, device, notes)
    save_shot_list(cfg, run_dir, {name: images for train_set, _ in data.values()
                                  for name, images in train_set.images_by_class().items()}, log)
    barrier()
    finish(run_dir, train_classes(cfg, data, run_dir, log, device, bool(args.resume)), log)


if __name__ == "__main__":
    sys.exit(run_cli(main, sys.argv[1:]))
