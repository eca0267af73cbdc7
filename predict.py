"""Score unlabeled images with a trained checkpoint: a CSV of image scores and a heatmap per image.

    python predict.py --checkpoint runs/mvtec_uni_.../checkpoint.pth --images new_parts/ --out predictions
    python predict.py ... --threshold f1 --class_name bottle   # normal/anomalous by the stored F1-max threshold
    python predict.py ... --threshold 0.042                    # or by a value of the image score
    python predict.py --checkpoint runs/mvtec3d_.../checkpoint.pth --images ../mvtec_3d_dinomaly/bagel/test --out p
                      # an MVTec 3D-AD run reads every rgb/<name>.png with its z/<name>.tiff (a prepared class
                      # folder, or any folder of rgb/ + z/ pairs)
    python predict.py ... --normalize --class_name bottle      # scores and heatmaps in [0, 1], 0.5 = threshold
    python predict.py ... --precision bf16                     # faster on a GPU or a CPU with bf16 units; maps
                                                               # differ from fp32's by about 1e-3 (README)

Writes <out>/scores.csv (file, score[, raw_score][, anomalous]) and <out>/heatmaps/*.png (image | heatmap).
Files that cannot be read are listed; if no image could be processed the exit status is non-zero.
"""
import argparse
import sys
from pathlib import Path
from typing import Optional

import torch

from datasets import DatasetLayoutError, sample_reader
from datasets.folder import to_input
from datasets.transforms import image_transform
from models import input_normalization
from predict_onnx import (NORMALIZE_HELP, UserError, find_images, output_name, pick_colour_scale, pick_score_scale,
                          pick_threshold, shown, write_scores)
from utils.checkpoint import load_checkpoint, model_from_checkpoint
from utils.config import add_config_flags, collect_overrides, parse_known, validate
from utils.evaluation import normalization_scales, predict_maps
from utils.device import add_scoring_precision_flag, effective_precision, resolve_device, store_weights_for_autocast
from utils.run_setup import output_folder, run_cli
from utils.visualize import save_panel, to_display_image

SCRIPT_ERRORS = (UserError,)  # this script's own user mistakes, beside utils.run_setup.USER_ERRORS
PREDICT_KEYS = ("device", "batch_size", "encoder_weights", "weights_dir", "max_ratio", "allow_emulated_bf16")


def resolve_threshold(value: Optional[str], class_name: Optional[str], checkpoint: dict,
                      normalized: bool) -> Optional[float]:
    """None, a number, or 'f1': the image F1-max threshold the checkpoint stored for `class_name` (0.5, and
    a number on the [0, 1] scale, when `normalized`)."""
    results = checkpoint.get("results") or {}
    if normalized:
        return pick_threshold(value, class_name, dict.fromkeys(normalization_scales(results), 0.5))
    return pick_threshold(value, class_name, {name: row["image_threshold"] for name, row in results.items()})


def score_scale(checkpoint: dict, class_name: Optional[str]) -> dict[str, list[float]]:
    """The --normalize scale of the class that training's last evaluation stored in the checkpoint."""
    return pick_score_scale(class_name, normalization_scales(checkpoint.get("results") or {}),
                            f"checkpoint {checkpoint['path']}")


def colour_scale(checkpoint: dict, class_name: Optional[str]) -> Optional[tuple[float, float]]:
    """Heatmap range seen on the test set of the class (or of all classes) at the last evaluation."""
    results = checkpoint.get("results") or {}
    return pick_colour_scale(class_name, {name: (row["map_min"], row["map_max"]) for name, row in results.items()})


def find_inputs(root: Path, cfg: dict) -> list[Path]:
    """The images under `root`; for an MVTec 3D-AD run the PNGs of rgb/ folders (each read with the
    z/<name>.tiff beside its folder)."""
    paths = find_images(root)
    if cfg["dataset"] != "mvtec3d":
        return paths
    paths = [p for p in paths if p.parent.name == "rgb" and p.suffix.lower() == ".png"]
    if not paths:
        raise UserError(f"no rgb/<name>.png images under {root}: an MVTec 3D-AD run reads rgb/ + z/ pairs "
                        "(a class folder of prepare_data/prepare_mvtec3d.py's tree)")
    return paths


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     allow_abbrev=False)
    parser.add_argument("--checkpoint", required=True, help="a checkpoint.pth written by training")
    parser.add_argument("--images", required=True, help="an image file or a folder (searched recursively)")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--threshold", help="a score value, or 'f1' for the threshold stored in the checkpoint")
    parser.add_argument("--class_name", help="which class's stored threshold and colour scale to use")
    parser.add_argument("--no_heatmaps", action="store_true", help="write only scores.csv")
    parser.add_argument("--normalize", action="store_true", help=NORMALIZE_HELP)
    add_scoring_precision_flag(parser)
    add_config_flags(parser, PREDICT_KEYS)
    args = parse_known(parser, argv)

    checkpoint = load_checkpoint(Path(args.checkpoint))
    cfg = validate({**checkpoint["config"], **collect_overrides(args, PREDICT_KEYS)}, "checkpoint config + command line")
    normalization = score_scale(checkpoint, args.class_name) if args.normalize else None
    threshold = resolve_threshold(args.threshold, args.class_name, checkpoint, args.normalize)
    root = Path(args.images)
    paths = find_inputs(root, cfg)
    device = resolve_device(cfg["device"])
    precision = effective_precision({**cfg, "precision": args.precision}, device, print)
    model = store_weights_for_autocast(model_from_checkpoint(checkpoint, cfg).to(device).eval(), precision)
    mean_std = input_normalization(cfg)
    transform = image_transform(cfg["image_size"], cfg["crop_size"], *mean_std)
    read = sample_reader(cfg)
    scale = colour_scale(checkpoint, args.class_name)
    out = output_folder(args.out, "--out")
    out.mkdir(parents=True, exist_ok=True)

    rows, failed = [], []
    for start in range(0, len(paths), cfg["batch_size"]):
        batch, tensors = [], []
        for path in paths[start:start + cfg["batch_size"]]:
            try:
                tensors.append(to_input(transform, read(path)))
                batch.append(path)
            except DatasetLayoutError as error:
                failed.append((path, str(error)))
        if not batch:
            continue
        images = torch.stack(tensors)
        maps, scores = predict_maps(model, images.to(device), cfg, precision)
        for path, image, amap, raw_score in zip(batch, images, maps.cpu().numpy(), scores.tolist()):
            score, amap, vmin, vmax = shown(raw_score, amap, normalization, scale)
            rows.append((path, score, raw_score))
            if not args.no_heatmaps:
                verdict = "" if threshold is None else ("  ANOMALOUS" if score >= threshold else "  normal")
                display = to_display_image(image[:3], cfg["map_size"], *mean_std)  # RGB of RGB-D
                save_panel(out / "heatmaps" / output_name(path, root), display,
                           amap, vmin, vmax, title=f"{path.name}  score {score:.4f}{verdict}")

    return write_scores(out, rows, failed, threshold, args.normalize)


if __name__ == "__main__":
    sys.exit(run_cli(main, sys.argv[1:], SCRIPT_ERRORS))
