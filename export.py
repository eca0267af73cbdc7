"""Export a trained model to ONNX: one graph from an image batch to anomaly maps and image scores, its
parity with PyTorch proven before the file is written.

    python export.py --checkpoint runs/mvtec_uni_.../checkpoint.pth --out dinomaly.onnx
    python export.py --checkpoint runs/mvtec_sep_... --class_name bottle --out bottle.onnx   # separated run
    python export.py --checkpoint runs/mvtec_sep_... --out models/                 # every class: models/<class>.onnx
    python export.py ... --images ../mvtec_anomaly_detection/bottle/test           # parity on these images

The graph's input `images` is float32 RGB in [0, 1], B x 3 x crop x crop, after the run's
Resize((image_size, image_size)) and CenterCrop(crop_size), NOT normalised: the encoder's normalisation
is inside, so the deployed side only resizes and crops (predict_onnx.py does exactly that). The batch
dimension is dynamic. Outputs: `anomaly_map` (B x map_size x map_size, smoothed as evaluation smooths
it) and `score` (B, the mean of the top max_ratio of the map). The ONNX metadata holds the per-class
F1-max image thresholds the run stored, the test-set colour scale of the maps, the score scale of
predict_onnx.py --normalize (image and map min, F1-max threshold, max), the resize and crop sizes and
the run's config.

Before writing, the exporter runs ONNX Runtime and PyTorch on the same images (the run's test images if
its data is there or --images is given, else generated ones) at batch 1 and 3, prints max |diff| of maps
and scores, and refuses to write a file whose maps differ by more than 1e-4 or scores by more than 1e-5
relative. Needs `pip install -r requirements-onnx.txt`.
"""
import argparse
import json
import os
import sys
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn as nn

from datasets import load_image
from datasets.transforms import resize_and_crop
from models import input_normalization
from models.registry import check_encoder_weights
from predict_onnx import find_images
from utils.checkpoint import load_checkpoint, model_from_checkpoint
from utils.config import ConfigError, add_config_flags, collect_overrides, dump, parse_known, validate
from utils.evaluation import normalization_scales, predict_maps
from utils.run_setup import output_folder, run_cli

EXPORT_KEYS = ("encoder_weights", "weights_dir")
MAP_TOLERANCE, SCORE_TOLERANCE = 1e-4, 1e-5  # max |diff| of maps; max |diff| / |score| of scores
PARITY_IMAGES = 4                             # checked as a batch of 1 and a batch of 3
OPSET = 18


class ExportError(RuntimeError):
    """An export that cannot be written: a missing package, or ONNX Runtime disagreeing with PyTorch."""


SCRIPT_ERRORS = (ExportError,)  # this script's own user mistakes, beside utils.run_setup.USER_ERRORS


def onnx_packages():
    """onnx and onnxruntime, or one line saying what to install."""
    try:
        import onnx
        import onnxruntime
    except ImportError as error:
        raise ExportError(f"export needs {error.name}: pip install -r requirements-onnx.txt") from None
    return onnx, onnxruntime


def ort_session(path: Path, provider: str):
    """An ONNX Runtime session as predict_onnx.py opens one: basic graph optimisations only. ORT's fusions
    (ORT_ENABLE_ALL) add float32 error of their own, up to 1.5x more on low scores of the tested models."""
    _, ort = onnx_packages()
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    return ort.InferenceSession(str(path), options, providers=[provider])


class ScoringGraph(nn.Module):
    """What is exported: images in [0, 1] -> (anomaly maps B x S x S, image scores B); normalises inside."""

    def __init__(self, model: nn.Module, cfg: dict, precision: str = "fp32"):
        super().__init__()
        self.model, self.cfg, self.precision = model, cfg, precision  # predict.py's --precision (benchmarks)
        mean, std = input_normalization(cfg)
        self.register_buffer("input_mean", torch.tensor(mean).view(1, 3, 1, 1))
        self.register_buffer("input_std", torch.tensor(std).view(1, 3, 1, 1))

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return predict_maps(self.model, (images - self.input_mean) / self.input_std, self.cfg, self.precision)


def export_graph(graph: ScoringGraph, crop_size: int, path: Path) -> None:
    example = torch.rand(2, 3, crop_size, crop_size)
    torch.onnx.export(graph, (example,), str(path), input_names=["images"], output_names=["anomaly_map", "score"],
                      dynamic_shapes=({0: torch.export.Dim("batch")},), opset_version=OPSET, dynamo=True,
                      external_data=False, verbose=False, optimize=False)


def metadata(checkpoint: dict, cfg: dict) -> dict[str, str]:
    """What the deployed side needs besides the graph: preprocessing sizes, thresholds, colour and score scales."""
    results = checkpoint.get("results") or {}
    return {"dinomaly.format": "1",
            "dinomaly.input": (f"float32 RGB in [0, 1], B x 3 x {cfg['crop_size']} x {cfg['crop_size']}: "
                               f"Resize(({cfg['image_size']}, {cfg['image_size']})) bilinear as PIL, then "
                               f"CenterCrop({cfg['crop_size']}); not normalised"),
            "dinomaly.image_size": str(cfg["image_size"]), "dinomaly.crop_size": str(cfg["crop_size"]),
            "dinomaly.classes": json.dumps(list(checkpoint["classes"])),
            "dinomaly.image_thresholds": json.dumps({k: r["image_threshold"] for k, r in results.items()}),
            "dinomaly.colour_scale": json.dumps({k: [r["map_min"], r["map_max"]] for k, r in results.items()}),
            "dinomaly.normalization": json.dumps(normalization_scales(results)),
            "dinomaly.onnxruntime": "checked with graph_optimization_level ORT_ENABLE_BASIC",
            "dinomaly.checkpoint": str(checkpoint["path"]), "dinomaly.step": str(checkpoint.get("step", "")),
            "dinomaly.config": dump(cfg)}


def parity_images(cfg: dict, images: Optional[str], classes: list[str]) -> tuple[torch.Tensor, str]:
    """PARITY_IMAGES images through the run's resize and crop: --images, else the run's test images when its
    data is at hand, else smooth random images (seeded)."""
    transform = resize_and_crop(cfg["image_size"], cfg["crop_size"])
    if images is None:
        tests = [Path(cfg["data_path"]) / name / "test" for name in classes]
        found = [p for folder in tests if folder.is_dir() for p in find_images(folder)]
        if found:
            picks = np.linspace(0, len(found) - 1, PARITY_IMAGES).round().astype(int)
            return torch.stack([transform(load_image(found[i])) for i in picks]), f"test images of {cfg['data_path']}"
        generator = torch.Generator().manual_seed(0)
        coarse = torch.rand(PARITY_IMAGES, 3, 8, 8, generator=generator)
        smooth = nn.functional.interpolate(coarse, size=cfg["crop_size"], mode="bicubic", align_corners=False)
        noise = 0.05 * torch.rand(smooth.shape, generator=generator)
        return (smooth + noise).clamp(0, 1), "generated images (no test images at hand)"
    paths = find_images(Path(images))
    picks = [paths[i % len(paths)] for i in range(PARITY_IMAGES)]
    return torch.stack([transform(load_image(p)) for p in picks]), f"images of {images}"


def check_parity(path: Path, graph: ScoringGraph, images: torch.Tensor) -> tuple[float, float]:
    """ONNX Runtime against PyTorch at batch 1 and 3: (max |map diff|, max relative score diff)."""
    session = ort_session(path, "CPUExecutionProvider")
    worst_map = worst_score = 0.0
    for batch in (images[:1], images[1:4]):
        with torch.no_grad():
            maps, scores = graph(batch)
        onnx_maps, onnx_scores = session.run(None, {"images": batch.numpy()})
        worst_map = max(worst_map, float(np.abs(onnx_maps - maps.numpy()).max()))
        relative = np.abs(onnx_scores - scores.numpy()) / np.maximum(np.abs(scores.numpy()), 1e-12)
        worst_score = max(worst_score, float(relative.max()))
    return worst_map, worst_score


def export_one(checkpoint: dict, cfg: dict, out: Path, images: Optional[str]) -> None:
    """Export, add the metadata, prove parity, then move the file into place (nothing written on failure)."""
    onnx, _ = onnx_packages()
    model = model_from_checkpoint(checkpoint, cfg).eval()
    graph = ScoringGraph(model, cfg).eval()
    batch, source = parity_images(cfg, images, list(checkpoint["classes"]))
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".part")
    try:
        export_graph(graph, cfg["crop_size"], tmp)
        proto = onnx.load(str(tmp))
        for key, value in metadata(checkpoint, cfg).items():
            proto.metadata_props.add(key=key, value=value)
        onnx.save(proto, str(tmp))
        map_diff, score_diff = check_parity(tmp, graph, batch)
        print(f"parity on {PARITY_IMAGES} {source}, batch 1 and 3: max |map diff| {map_diff:.2e} "
              f"(limit {MAP_TOLERANCE:.0e}), max relative score diff {score_diff:.2e} (limit {SCORE_TOLERANCE:.0e})")
        if not (map_diff <= MAP_TOLERANCE and score_diff <= SCORE_TOLERANCE):
            raise ExportError(f"ONNX Runtime disagrees with PyTorch for {checkpoint['path']} (maps {map_diff:.2e}, "
                              f"scores {score_diff:.2e} relative): {out} not written")
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    print(f"wrote {out} ({out.stat().st_size / 2 ** 20:.1f} MiB): input images B x 3 x {cfg['crop_size']} x "
          f"{cfg['crop_size']} in [0, 1] after Resize({cfg['image_size']}) and CenterCrop({cfg['crop_size']})")


def checkpoints_to_export(path: Path, class_name: Optional[str]) -> list[Path]:
    """checkpoint.pth, a unified run directory, or a separated one (its class folders: one, or all)."""
    if path.is_file():
        return [path]
    if (path / "checkpoint.pth").is_file():
        return [path / "checkpoint.pth"]
    per_class = sorted(path.glob("*/checkpoint.pth"))
    if not path.is_dir() or not per_class:
        raise FileNotFoundError(f"no checkpoint at {path} (a checkpoint.pth, or a run directory holding one or "
                                f"<class>/checkpoint.pth)")
    if class_name is None:
        return per_class
    chosen = [p for p in per_class if p.parent.name == class_name]
    if not chosen:
        raise ConfigError(f"--class_name {class_name}: no {path / class_name / 'checkpoint.pth'}; classes: "
                          f"{', '.join(p.parent.name for p in per_class)}")
    return chosen


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     allow_abbrev=False)
    parser.add_argument("--checkpoint", required=True, help="checkpoint.pth, or a run directory")
    parser.add_argument("--out", required=True, help="the .onnx file; a folder when exporting every class")
    parser.add_argument("--class_name", help="separated runs: the class whose model to export")
    parser.add_argument("--images", help="images for the parity check (default: the run's test images)")
    add_config_flags(parser, EXPORT_KEYS)
    args = parse_known(parser, argv)
    onnx_packages()
    paths = checkpoints_to_export(Path(args.checkpoint), args.class_name)
    out = Path(args.out)
    if len(paths) == 1 and (out.suffix != ".onnx" or out.is_dir()):
        raise ConfigError(f"--out {out}: give a file name ending in .onnx")
    if len(paths) > 1:
        output_folder(out, "--out")
    else:
        output_folder(out.parent, "--out")
    jobs = []
    for path in paths:  # every mistake is found before anything is exported
        checkpoint = load_checkpoint(path)
        cfg = validate({**checkpoint["config"], **collect_overrides(args, EXPORT_KEYS)}, f"config saved in {path}")
        if cfg["dataset"] == "mvtec3d":
            raise ConfigError(f"{path}: exporting an MVTec 3D-AD run is not supported (the graph would need the depth "
                              "rendering and the masking by depth); score it with predict.py")
        check_encoder_weights(cfg["encoder"], cfg["encoder_weights"], cfg["weights_dir"])
        jobs.append((checkpoint, cfg, out if len(paths) == 1 else out / f"{path.parent.name}.onnx"))
    with torch.no_grad():
        for checkpoint, cfg, target in jobs:
            export_one(checkpoint, cfg, target, args.images)


if __name__ == "__main__":
    sys.exit(run_cli(main, sys.argv[1:], SCRIPT_ERRORS))
