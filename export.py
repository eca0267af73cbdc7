"""Export a trained model to ONNX: one graph from an image batch to anomaly maps and image scores, its
parity with PyTorch proven before the file is written.

    python export.py --checkpoint runs/mvtec_uni_.../checkpoint.pth --out dinomaly.onnx
    python export.py --checkpoint runs/mvtec_sep_... --class_name bottle --out bottle.onnx   # separated run
    python export.py --checkpoint runs/mvtec_sep_... --out models/                 # every class: models/<class>.onnx
    python export.py ... --images ../mvtec_anomaly_detection/bottle/test           # parity on these images
    python export.py --checkpoint RUN --out model_int8.onnx --precision int8       # int8 for ONNX Runtime's CPU

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

--precision int8 writes a dynamically quantized model (onnxruntime.quantization, no other package), 2-2.8x
the fp32 model's images/s on a CPU with VNNI (README): every linear layer's weights in int8 per output
channel, its input quantized to uint8 at run time with one scale per tensor, the rest fp32. One scale per
tensor is wasted on the few LayerNorm output channels that real DINOv2 weights make 5-30x larger than the
rest, so each LayerNorm -> Linear pair is first smoothed as SmoothQuant does (`smoothed`); the smoothed fp32
graph computes the same function and passes the fp32 check above before it is quantized. The int8 model
is then compared with PyTorch's fp32 outputs on up to 32 images, one image at a time as predict_onnx.py
runs it: --images, else the run's test images spread over its classes and defects, with their labels and
masks, when its data is at hand, else 32 generated images. The exporter prints max |map diff|, max relative
score diff, the ranking and, on test images, I-AUROC and P-AUROC of fp32 and int8 (the 32 images pooled),
and refuses to write a model that orders two images otherwise than fp32 while their fp32 scores lie more
than 1% of the score range apart (closer pairs are ties at int8's resolution, counted but allowed), or whose
AUROC moves by more than 0.5 points. The metadata names the precision and the graph optimisation level
predict_onnx.py opens the model at (ORT_ENABLE_EXTENDED), and keeps the fp32 run's thresholds and scales:
int8 scores differ from fp32's by 0.1-0.3% typically (up to 1.8% measured with real ViT-S/14 weights), so
an image scoring that close to a threshold may change side.
"""
import argparse
import json
import os
import sys
from pathlib import Path
from typing import NamedTuple, Optional

import numpy as np
import torch
import torch.nn as nn

from datasets import TestSet, build_test_set, load_image, sample_reader
from datasets.transforms import resize_and_crop
from models import input_normalization
from models.registry import check_encoder_weights
from predict_onnx import BASIC, find_images, open_session
from utils.checkpoint import load_checkpoint, model_from_checkpoint
from utils.config import ConfigError, add_config_flags, collect_overrides, dump, parse_known, validate
from utils.evaluation import binarise_masks, normalization_scales, predict_maps
from utils.metrics import ranking_metrics
from utils.modality_metrics import has_both
from utils.quantization import SMOOTHING, input_peaks, quantize, smoothed
from utils.run_setup import output_folder, run_cli

EXPORT_KEYS = ("encoder_weights", "weights_dir")
MAP_TOLERANCE, SCORE_TOLERANCE = 1e-4, 1e-5  # max |diff| of maps; max |diff| / |score| of scores
PARITY_IMAGES = 4                             # checked as a batch of 1 and a batch of 3
OPSET = 18
PRECISIONS = ("fp32", "int8")
INT8_PARITY_IMAGES = 32     # the int8 check's images: enough pairs for a ranking to mean something
INT8_OPTIMIZATION = "ORT_ENABLE_EXTENDED"  # fuses each DynamicQuantizeLinear into its MatMulInteger
RANK_RESOLUTION = 0.01      # fp32 scores closer than this share of their range are ties int8 may order either way
AUROC_TOLERANCE = 0.005     # int8's I-AUROC and P-AUROC within 0.5 points of fp32's
CHUNK = 8                   # images per PyTorch pass of the int8 check: bounded memory at 392 px


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


def ort_session(path: Path, provider: str, level: str = BASIC):
    """The session predict_onnx.py opens (its open_session): an fp32 model with basic graph optimisations
    only (ORT's fusions, ORT_ENABLE_ALL, add float32 error of their own, up to 1.5x more on low scores of the
    tested models), an int8 one at the level its metadata names (INT8_OPTIMIZATION)."""
    _, ort = onnx_packages()
    return open_session(ort, path, level, [provider])


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


def generated_images(count: int, crop_size: int) -> torch.Tensor:
    """Smooth random images in [0, 1] (seeded): parity images when no real ones are at hand."""
    generator = torch.Generator().manual_seed(0)
    coarse = torch.rand(count, 3, 8, 8, generator=generator)
    smooth = nn.functional.interpolate(coarse, size=crop_size, mode="bicubic", align_corners=False)
    noise = 0.05 * torch.rand(smooth.shape, generator=generator)
    return (smooth + noise).clamp(0, 1)


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
        return generated_images(PARITY_IMAGES, cfg["crop_size"]), "generated images (no test images at hand)"
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


class ParitySet(NamedTuple):
    """The int8 check's images in [0, 1]; with test images of the run's data, their labels and their masks
    binarised at map size (None where the data has none)."""
    images: torch.Tensor
    source: str
    labels: Optional[torch.Tensor] = None
    masks: Optional[torch.Tensor] = None


def spread(total: int, count: int) -> np.ndarray:
    """min(count, total) distinct indices spread evenly over range(total)."""
    return np.linspace(0, total - 1, min(count, total)).round().astype(int)


def int8_parity_set(cfg: dict, images: Optional[str], classes: list[str]) -> ParitySet:
    """Up to INT8_PARITY_IMAGES images for the int8 check, spread evenly over --images, else over the run's
    test images (all classes, normal and defective, with labels and masks) when its data is at hand, else
    INT8_PARITY_IMAGES generated ones. The fp32 check's 4 images would show a changed ranking too rarely."""
    if images is not None:
        paths = find_images(Path(images))
        transform = resize_and_crop(cfg["image_size"], cfg["crop_size"])
        picked = torch.stack([transform(load_image(paths[i])) for i in spread(len(paths), INT8_PARITY_IMAGES)])
        return ParitySet(picked, f"images of {images}")
    if Path(cfg["data_path"]).is_dir():
        return labelled_test_images(cfg, classes)
    return ParitySet(generated_images(INT8_PARITY_IMAGES, cfg["crop_size"]),
                     "generated images (no test images at hand)")


def labelled_test_images(cfg: dict, classes: list[str]) -> ParitySet:
    """Test images of the run's data as evaluation reads them, but not normalised (the graph normalises)."""
    samples = [sample for name in classes for sample in build_test_set(cfg, name).samples]
    test_set = TestSet(samples, cfg["image_size"], cfg["crop_size"], (0.0,) * 3, (1.0,) * 3, read=sample_reader(cfg))
    items = [test_set[i] for i in spread(len(samples), INT8_PARITY_IMAGES)]
    masks = binarise_masks(torch.stack([item[1] for item in items]), cfg["map_size"], cfg["gt_threshold"])
    return ParitySet(torch.stack([item[0] for item in items]), f"test images of {cfg['data_path']}",
                     torch.tensor([item[2] for item in items]), masks if cfg["masks"] == "required" else None)


def torch_outputs(graph: ScoringGraph, images: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Maps and scores of the fp32 PyTorch graph: the int8 check's reference."""
    maps, scores = zip(*(graph(images[start:start + CHUNK]) for start in range(0, len(images), CHUNK)))
    return torch.cat(maps).numpy(), torch.cat(scores).numpy()


def int8_outputs(path: Path, images: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Maps and scores of an int8 model image by image, as predict_onnx.py runs it (in a batch, the per-tensor
    activation scales would make an image's score depend on the images beside it)."""
    session = ort_session(path, "CPUExecutionProvider", INT8_OPTIMIZATION)
    maps, scores = zip(*(session.run(None, {"images": images[i:i + 1].numpy()}) for i in range(len(images))))
    return np.concatenate(maps), np.concatenate(scores)


def order_changes(reference: np.ndarray, scores: np.ndarray) -> tuple[int, int]:
    """Pairs of images that `scores` order otherwise than `reference`: (those whose reference scores lie more
    than RANK_RESOLUTION of their range apart, the closer ones). Strict order cannot be the test: normal images
    of one class often score within 0.1% of each other, and int8 moves scores by about 1%."""
    gap = reference[:, None] - reference[None, :]
    swapped = (gap > 0) & (scores[:, None] <= scores[None, :])
    apart = gap > RANK_RESOLUTION * np.ptp(reference)
    return int((swapped & apart).sum()), int((swapped & ~apart).sum())


def aurocs(parity: ParitySet, maps: np.ndarray, scores: np.ndarray) -> dict[str, float]:
    """I-AUROC and P-AUROC of the parity images pooled over classes, where labels and masks allow them."""
    found = {}
    if parity.labels is not None and has_both(parity.labels.bool()):
        found["I-AUROC"] = ranking_metrics(torch.from_numpy(scores), parity.labels)["auroc"]
    if parity.masks is not None and has_both(parity.masks):
        found["P-AUROC"] = ranking_metrics(torch.from_numpy(maps), parity.masks)["auroc"]
    return found


def check_int8(path: Path, reference: tuple[np.ndarray, np.ndarray], parity: ParitySet, name: str, out: Path) -> str:
    """The int8 model against the fp32 PyTorch graph (`reference`, its maps and scores) on the parity images:
    prints and returns one report line; refuses (ExportError) a changed ranking or AUROC."""
    maps, scores = int8_outputs(path, parity.images)
    moved, ties = order_changes(reference[1], scores)
    fp32, int8 = aurocs(parity, *reference), aurocs(parity, maps, scores)
    auroc_diff = max((abs(int8[k] - fp32[k]) for k in fp32), default=0.0)
    map_diff = np.abs(maps - reference[0]).max()
    score_diff = (np.abs(scores - reference[1]) / np.abs(reference[1])).max()
    report = (f"int8 against fp32 on {len(scores)} {parity.source}: max |map diff| {map_diff:.2e}, "
              f"max relative score diff {score_diff:.2e}, ranking "
              f"{'kept' if not moved else 'changed'} ({moved} pairs more than {RANK_RESOLUTION:.0%} of the score range "
              f"apart swapped, {ties} closer ones)"
              + "".join(f", {k} {100 * fp32[k]:.2f} -> {100 * int8[k]:.2f}" for k in fp32))
    print(report)
    if moved or auroc_diff > AUROC_TOLERANCE:
        raise ExportError(f"the int8 model of {name} disagrees with fp32 ({moved} pairs of parity images ranked "
                          f"otherwise, AUROC {100 * auroc_diff:.2f} points apart, limit {100 * AUROC_TOLERANCE:.1f}): "
                          f"{out} not written")
    return report


def write_metadata(path: Path, values: dict[str, str]) -> None:
    """Set `values` in the model file's metadata, replacing the keys it has."""
    onnx, _ = onnx_packages()
    proto = onnx.load(str(path))
    kept = [(p.key, p.value) for p in proto.metadata_props if p.key not in values]
    del proto.metadata_props[:]
    for key, value in [*kept, *values.items()]:
        proto.metadata_props.add(key=key, value=value)
    onnx.save(proto, str(path))


def int8_metadata(report: str) -> dict[str, str]:
    """What an int8 file adds: how to open it (predict_onnx.py reads the level) and how far it is from fp32."""
    return {"dinomaly.precision": "int8",
            "dinomaly.graph_optimization_level": INT8_OPTIMIZATION,
            "dinomaly.onnxruntime": f"checked with graph_optimization_level {INT8_OPTIMIZATION}",
            "dinomaly.quantization": (f"onnxruntime.quantization.quantize_dynamic of every MatMul with a constant "
                                      f"weight: weights int8 per output channel, activations uint8 per tensor at "
                                      f"run time; LayerNorm -> Linear pairs smoothed first (SmoothQuant, alpha "
                                      f"{SMOOTHING}); the rest fp32"),
            "dinomaly.int8_parity": report}


def export_one(checkpoint: dict, cfg: dict, out: Path, images: Optional[str], precision: str = "fp32") -> None:
    """Export, add the metadata, prove parity, then move the file into place (nothing written on failure).
    int8: the fp32 graph is exported smoothed (`smoothed`), checked against PyTorch as an fp32 export is,
    quantized, and the int8 model checked against PyTorch's fp32 outputs on INT8_PARITY_IMAGES images."""
    model = model_from_checkpoint(checkpoint, cfg).eval()
    graph = ScoringGraph(model, cfg).eval()
    batch, source = parity_images(cfg, images, list(checkpoint["classes"]))
    parity = int8_parity_set(cfg, images, list(checkpoint["classes"])) if precision == "int8" else None
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp, tmp_int8 = out.with_name(out.name + ".part"), out.with_name(out.name + ".int8.part")
    try:
        if parity is not None:
            with input_peaks(graph) as peaks:  # SmoothQuant's calibration, on the pass of the fp32 reference
                reference = torch_outputs(graph, parity.images)
        export_graph(graph if parity is None else smoothed(graph, peaks), cfg["crop_size"], tmp)
        write_metadata(tmp, metadata(checkpoint, cfg))
        map_diff, score_diff = check_parity(tmp, graph, batch)
        print(f"parity on {PARITY_IMAGES} {source}, batch 1 and 3: max |map diff| {map_diff:.2e} "
              f"(limit {MAP_TOLERANCE:.0e}), max relative score diff {score_diff:.2e} (limit {SCORE_TOLERANCE:.0e})")
        if not (map_diff <= MAP_TOLERANCE and score_diff <= SCORE_TOLERANCE):
            raise ExportError(f"ONNX Runtime disagrees with PyTorch for {checkpoint['path']} (maps {map_diff:.2e}, "
                              f"scores {score_diff:.2e} relative): {out} not written")
        if parity is not None:
            quantize(tmp, tmp_int8)
            report = check_int8(tmp_int8, reference, parity, checkpoint["path"], out)
            write_metadata(tmp_int8, {**metadata(checkpoint, cfg), **int8_metadata(report)})
        os.replace(tmp if parity is None else tmp_int8, out)
    finally:
        tmp.unlink(missing_ok=True)
        tmp_int8.unlink(missing_ok=True)
    print(f"wrote {out} ({out.stat().st_size / 2 ** 20:.1f} MiB{'' if parity is None else ', int8'}): input images "
          f"B x 3 x {cfg['crop_size']} x {cfg['crop_size']} in [0, 1] after Resize({cfg['image_size']}) and "
          f"CenterCrop({cfg['crop_size']})")


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
    parser.add_argument("--precision", default="fp32", help="fp32, or int8: dynamically quantized for ONNX Runtime's "
                                                            "CPU provider, 2-2.8x faster with VNNI, scores within 2%%")
    add_config_flags(parser, EXPORT_KEYS)
    args = parse_known(parser, argv)
    if args.precision not in PRECISIONS:
        raise ConfigError(f"--precision {args.precision}: one of {', '.join(PRECISIONS)}")
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
            export_one(checkpoint, cfg, target, args.images, args.precision)


if __name__ == "__main__":
    sys.exit(run_cli(main, sys.argv[1:], SCRIPT_ERRORS))
