"""Dinomaly, class-separated setting: one model per class, trained in sequence with the same recipe.

    python train_sep.py --data_path ../mvtec_anomaly_detection
    python train_sep.py --config configs/visa_sep.yaml --data_path ../VisA_pytorch/1cls

The training loop is train_uni.train; only the outer loop over classes differs. `--resume RUN_DIR`
skips the finished classes and continues the interrupted one at its last checkpoint. A run writes, under
<output_dir>/<run_name>/: config.yaml, log.txt, <class>/checkpoint.pth for every class, and
results.csv / results.md with one row per class and the mean, plus results_per_defect.csv.
"""
import sys

from datasets import dataset_classes
from train_uni import (USER_ERRORS, finish, finished_result, load_data, log_counts, open_run, previous_checkpoint,
                       start, train)
from utils.distributed import barrier, is_main
from utils.evaluation import EvaluationResult, write_tables


def main(argv: list[str]) -> None:
    cfg, args, device = start(argv, "mvtec_sep.yaml", __doc__)
    data = {name: load_data(cfg, [name]) for name in dataset_classes(cfg)}
    run_dir, log = open_run(cfg, args, device)
    barrier()
    combined = EvaluationResult(rows={}, defects=[], images=0, seconds=0.0)
    for i, (name, (train_set, test_sets)) in enumerate(data.items()):
        class_dir = run_dir / name
        checkpoint = previous_checkpoint(class_dir / "checkpoint.pth") if args.resume else None
        result = finished_result(checkpoint)
        log(f"=== class {i + 1}/{len(data)}: {name}" + (" (finished earlier)" if result else ""))
        if result is None:
            log_counts(log, train_set, test_sets)
            class_dir.mkdir(exist_ok=True)
            barrier()
            result = train(cfg, train_set, test_sets, class_dir, log, device, checkpoint)
        if is_main():
            combined.rows.update(result.rows)
            combined.defects += result.defects
            write_tables(run_dir, combined)  # the table so far, after every class
    finish(run_dir, combined, log)


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except USER_ERRORS as error:
        sys.exit(f"error: {error}")
