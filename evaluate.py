"""Evaluate trained Dinomaly checkpoints: the per-class table, a per-defect breakdown, inference
throughput and peak memory, and optionally heatmap overlays.

    python evaluate.py --checkpoint runs/mvtec_uni_20260101_120000/checkpoint.pth
    python evaluate.py --run_dir runs/mvtec_sep_20260101_120000          # every class model of a run
    python evaluate.py --run_dir runs/... --data_path /data/mvtec --save_maps 4 --gt_threshold 0.5
    python evaluate.py --run_dir runs/... --data_path my_parts --masks none     # image labels only
    python evaluate.py --checkpoint runs/.../checkpoint.pth --precision bf16    # what bf16 scoring moves

The model is rebuilt from the config saved in the checkpoint. Only the evaluation keys below can be
overridden (data location, device, protocol options), so the architecture always matches the weights.
Results go to <run_dir>/eval_<date>_<time>/ (or --out): results.csv, results.md,
results_per_defect.csv, eval_config.yaml, log.txt and maps/<class>/*.png.
"""
import argparse
import datetime
import sys
from pathlib import Path

import numpy as np

from datasets import TestSet, build_test_set, class_folder
from models.registry import check_encoder_weights
from utils.checkpoint import load_checkpoint, model_from_checkpoint
from utils.config import add_config_flags, collect_overrides, dump, parse_known, validate
from utils.evaluation import ClassOutputs, EvaluationResult, evaluate, format_markdown, write_tables
from utils.device import (add_scoring_precision_flag, effective_precision, peak_memory_mib, resolve_device,
                          store_weights_for_autocast)
from utils.run_setup import RunLog, output_folder, run_cli
from utils.visualize import sample_panel, write_png

EVAL_KEYS = ("data_path", "dataset", "classes", "realiad_split", "realiad_images", "realiad_maskless", "masks",
             "device", "batch_size", "num_workers", "encoder_weights", "weights_dir", "gt_threshold", "max_ratio",
             "aupro_thresholds", "aupro_fpr_limit", "allow_emulated_bf16")


def find_checkpoints(args: argparse.Namespace) -> tuple[list[Path], Path]:
    """The checkpoints to evaluate and the run directory they belong to."""
    if args.checkpoint:
        path = Path(args.checkpoint)
        return [path], (path if path.is_dir() else path.parent)
    run_dir = Path(args.run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"run directory not found: {run_dir}")
    if (run_dir / "checkpoint.pth").is_file():
        return [run_dir / "checkpoint.pth"], run_dir
    per_class = sorted(run_dir.glob("*/checkpoint.pth"))
    if not per_class:
        raise FileNotFoundError(f"no checkpoint.pth in {run_dir} or in its class folders")
    return per_class, run_dir


def map_saver(out_dir: Path, count: int, cfg: dict):
    """A callback writing image | ground truth | heatmap (image | heatmap without masks) for `count` evenly
    spaced test images of a class."""
    def save(name: str, dataset: TestSet, outputs: ClassOutputs) -> None:
        vmin, vmax = float(outputs.maps.min()), float(outputs.maps.max())
        for i in np.unique(np.linspace(0, len(dataset) - 1, min(count, len(dataset))).round().astype(int)):
            sample = dataset.samples[i]
            view = "" if sample.view is None else f"_view{sample.view}"
            write_png(out_dir / "maps" / class_folder(name) / f"{sample.defect}_{sample.image.stem}{view}.png",
                      sample_panel(dataset, outputs, i, cfg, vmin, vmax))
    return save



def prepare_job(checkpoint: dict, overrides: dict, precision: str, note) -> tuple[dict, dict, list[str], dict, str]:
    """A checkpoint with its config, classes, test sets and scoring precision, its encoder weights checked."""
    cfg = validate({**checkpoint["config"], **overrides}, f"config of {checkpoint['path']} + command line")
    check_encoder_weights(cfg["encoder"], cfg["encoder_weights"], cfg["weights_dir"])
    classes = overrides.get("classes") or checkpoint["classes"]
    precision = effective_precision({**cfg, "precision": precision}, resolve_device(cfg["device"]), note)
    return checkpoint, cfg, classes, {name: build_test_set(cfg, name) for name in classes}, precision


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     allow_abbrev=False)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", help="a checkpoint.pth (or the folder holding it)")
    source.add_argument("--run_dir", help="a run directory: its checkpoint.pth or <class>/checkpoint.pth files")
    parser.add_argument("--out", help="output folder (default <run_dir>/eval_<date>_<time>)")
    parser.add_argument("--save_maps", type=int, default=0, metavar="N", help="heatmap PNGs for N images per class")
    add_scoring_precision_flag(parser)
    add_config_flags(parser, EVAL_KEYS)
    args = parse_known(parser, argv)
    overrides = collect_overrides(args, EVAL_KEYS)

    paths, run_dir = find_checkpoints(args)
    notes = []  # every mistake is found before anything is written
    jobs = [prepare_job(load_checkpoint(path), overrides, args.precision, notes.append) for path in paths]
    out_dir = output_folder(args.out or run_dir / f"eval_{datetime.datetime.now():%Y%m%d_%H%M%S}", "--out")
    out_dir.mkdir(parents=True, exist_ok=False)
    log = RunLog(out_dir)
    for line in dict.fromkeys(notes):
        log(line)
    combined = EvaluationResult(rows={}, defects=[], images=0, seconds=0.0)
    for checkpoint, cfg, classes, test_sets, precision in jobs:
        device = resolve_device(cfg["device"])
        model = store_weights_for_autocast(model_from_checkpoint(checkpoint, cfg).to(device), precision)
        (out_dir / "eval_config.yaml").write_text(dump(cfg))
        log(f"checkpoint {checkpoint['path']} (step {checkpoint['step']}) on {device}, {precision}: "
            f"{', '.join(classes)}")
        saver = map_saver(out_dir, args.save_maps, cfg) if args.save_maps > 0 else None
        result = evaluate(model, test_sets, cfg, device, log, on_class=saver, precision=precision)
        combined.rows.update(result.rows)
        combined.defects += result.defects
        combined.images += result.images
        combined.seconds += result.seconds
    write_tables(out_dir, combined)
    log("\n" + format_markdown(combined.rows))
    log(f"inference: {combined.images} images, {combined.images_per_second:.1f} images/s "
        f"(model and map time), peak memory {peak_memory_mib(device):.0f} MiB")
    log(f"results written to {out_dir}")


if __name__ == "__main__":
    sys.exit(run_cli(main, sys.argv[1:]))
