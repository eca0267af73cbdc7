"""Score images with an exported model (export.py) without PyTorch or this repository: numpy, OpenCV and
ONNX Runtime only. Copy this one file and the .onnx file to the machine that scores.

    pip install -r requirements-onnx.txt      # numpy, opencv-python-headless, onnxruntime
    python predict_onnx.py --model dinomaly.onnx --images new_parts/ --out predictions
    python predict_onnx.py ... --threshold f1 --class_name bottle  # normal/anomalous by the stored F1-max threshold
    python predict_onnx.py ... --threshold 0.042                   # or by a value of the image score
    python predict_onnx.py ... --normalize --class_name bottle     # scores and maps in [0, 1], 0.5 = threshold

Writes what predict.py writes: <out>/scores.csv (file, score[, raw_score][, anomalous]) and
<out>/heatmaps/*.png (image | heatmap, on the test-set colour scale the model carries). The
preprocessing is the run's, bit for bit: images are resized as PIL's bilinear resize does it
(re-implemented below in integer arithmetic, so the model sees the same pixels as in training),
centre-cropped as torchvision crops and scaled to [0, 1]; the model normalises inside. PNG, BMP and TIFF decode identically in OpenCV and PIL;
JPEG decoders may differ in the last bit of a few pixels.

An int8 model (export.py --precision int8) is scored with the same command: the session is opened at the
graph optimisation level its metadata names, and it runs image by image, as the exporter checked it (in a
batch, its per-tensor activation scales would make a score depend on the other images). Its scores differ
from the fp32 model's by 0.1-0.3% typically (up to 1.8% measured), and --normalize and --threshold f1 use the
fp32 run's stored scale and threshold: an image that close to the threshold may change side.
"""
import argparse
import csv
import json
import math
import sys
from pathlib import Path
from typing import Optional

import cv2
import numpy as np

IMG_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")  # as the repository's datasets/folder.py
PRECISION_BITS = 32 - 8 - 2  # PIL's fixed-point precision for 8-bit images
BASIC = "ORT_ENABLE_BASIC"   # the graph optimisation level of fp32 exports (and of those older than the key)


NORMALIZE_HELP = ("scores and heatmaps in [0, 1]: the class's stored F1-max threshold at 0.5, the test-set min and "
                  "max of the run's last evaluation at 0 and 1 (clipped); --threshold is then on this scale (f1 = 0.5)")


class UserError(ValueError):
    """A mistake in what the user handed us: reported as one line (predict.py reports it the same way)."""


def pil_coefficients(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray]:
    """PIL's bilinear taps (Resample.c, precompute_coeffs + normalize_coeffs_8bpc): for each output index
    the source indices (out x taps) and their fixed-point weights (zero past each output's window)."""
    scale = in_size / out_size
    filter_scale = max(scale, 1.0)
    support = filter_scale  # the bilinear filter's support is 1
    taps = math.ceil(support) * 2 + 1
    index = np.zeros((out_size, taps), np.int64)
    weight = np.zeros((out_size, taps), np.int64)
    reciprocal = 1.0 / filter_scale
    for out in range(out_size):
        center = (out + 0.5) * scale
        first = max(int(center - support + 0.5), 0)
        count = min(int(center + support + 0.5), in_size) - first
        w = [max(0.0, 1.0 - abs((x + first - center + 0.5) * reciprocal)) for x in range(count)]
        total = sum(w)
        w = [v / total if total != 0.0 else v for v in w]
        index[out, :count] = np.arange(first, first + count)
        weight[out, :count] = [int((0.5 if v >= 0 else -0.5) + v * (1 << PRECISION_BITS)) for v in w]
    return index, weight


def resample_axis(image: np.ndarray, out_size: int, axis: int) -> np.ndarray:
    """One pass of PIL's separable resize along `axis` (0 rows, 1 columns) of an H x W x 3 uint8 image."""
    index, weight = pil_coefficients(image.shape[axis], out_size)
    taps = np.take(image.astype(np.int64), index, axis=axis)  # axis becomes out x taps
    shape = [1] * taps.ndim
    shape[axis], shape[axis + 1] = weight.shape
    total = (taps * weight.reshape(shape)).sum(axis=axis + 1) + (1 << (PRECISION_BITS - 1))
    return np.clip(total >> PRECISION_BITS, 0, 255).astype(np.uint8)


def pil_resize(image: np.ndarray, size: int) -> np.ndarray:
    """PIL's Image.resize((size, size), BILINEAR) of an RGB uint8 array as Pillow's Resample.c computes it:
    columns first, then rows, each pass rounded to 8 bits, skipped when that side keeps its size. (A Pillow
    build that runs the rows first for some shapes differs by at most one grey level in a few pixels.)"""
    if image.shape[1] != size:
        image = resample_axis(image, size, axis=1)
    if image.shape[0] != size:
        image = resample_axis(image, size, axis=0)
    return image


def center_crop(image: np.ndarray, size: int) -> np.ndarray:
    """torchvision's CenterCrop of an image at least `size` on each side (offsets rounded as it rounds)."""
    top = int(round((image.shape[0] - size) / 2.0))
    left = int(round((image.shape[1] - size) / 2.0))
    return image[top:top + size, left:left + size]


def read_rgb(path: Path) -> Optional[np.ndarray]:
    """The image as RGB uint8 (grey and palette images expanded, alpha dropped, EXIF orientation ignored,
    as PIL's convert('RGB') does); None when it cannot be decoded."""
    image = cv2.imread(str(path), cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION)
    return None if image is None else np.ascontiguousarray(image[..., ::-1])


def preprocess(image: np.ndarray, image_size: int, crop_size: int) -> np.ndarray:
    """3 x crop x crop float32 in [0, 1]: Resize((image_size, image_size)), ToTensor, CenterCrop(crop_size)."""
    crop = center_crop(pil_resize(image, image_size), crop_size)
    return (crop.astype(np.float32) / np.float32(255)).transpose(2, 0, 1)


def find_images(path: Path) -> list[Path]:
    """The image itself, or every image under the folder (sorted, recursively)."""
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise FileNotFoundError(f"no such file or folder: {path}")
    images = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMG_EXTENSIONS)
    if not images:
        raise FileNotFoundError(f"no images ({', '.join(IMG_EXTENSIONS)}) in {path}")
    return images


def output_name(path: Path, root: Path) -> str:
    relative = path.relative_to(root) if root.is_dir() else Path(path.name)
    return "__".join(relative.with_suffix("").parts) + ".png"


def heatmap_panel(crop: np.ndarray, amap: np.ndarray, vmin: float, vmax: float, title: str) -> np.ndarray:
    """image | jet heatmap blended over it, with a caption: the panel predict.py writes (RGB uint8)."""
    size = amap.shape[0]
    rgb = (cv2.resize(crop.transpose(1, 2, 0), (size, size), interpolation=cv2.INTER_LINEAR) * 255).round()
    rgb = rgb.clip(0, 255).astype(np.uint8)
    scaled = np.clip((amap - vmin) / max(vmax - vmin, 1e-12), 0, 1)
    colored = cv2.applyColorMap((scaled * 255).astype(np.uint8), cv2.COLORMAP_JET)[..., ::-1]
    overlay = (0.5 * colored + 0.5 * rgb).round().astype(np.uint8)
    row = np.concatenate([rgb, np.full((size, 4, 3), 255, np.uint8), overlay], axis=1)
    row = np.concatenate([np.full((22, row.shape[1], 3), 255, np.uint8), row], axis=0)
    cv2.putText(row, title, (4, 16), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (0, 0, 0), 1, cv2.LINE_AA)
    return row


def open_session(onnxruntime, path: Path, level: str, providers: list[str]):
    """An ONNX Runtime session at the graph optimisation level export.py checked parity at: basic for fp32
    models (ORT's fusions add float32 error of their own), the level an int8 model's metadata names."""
    options = onnxruntime.SessionOptions()
    options.graph_optimization_level = getattr(onnxruntime.GraphOptimizationLevel, level)
    try:
        return onnxruntime.InferenceSession(str(path), options, providers=providers)
    except Exception as error:
        reason = str(error).strip().splitlines()[0]
        raise UserError(f"could not load {path} (not an ONNX model, or corrupt): {reason}") from None


class ExportedModel:
    """An export.py file in ONNX Runtime, with the preprocessing sizes, thresholds and colour scale it carries."""

    def __init__(self, path: Path, providers: Optional[list[str]] = None):
        try:
            import onnxruntime
        except ImportError:
            raise UserError("predict_onnx.py needs onnxruntime: pip install -r requirements-onnx.txt") from None
        if not path.is_file():
            raise UserError(f"model not found: {path}")
        providers = providers or onnxruntime.get_available_providers()
        self.session = open_session(onnxruntime, path, BASIC, providers)
        meta = self.session.get_modelmeta().custom_metadata_map
        if meta.get("dinomaly.format") != "1":
            raise UserError(f"{path} is an ONNX model but not one written by export.py (no dinomaly metadata)")
        level = meta.get("dinomaly.graph_optimization_level", BASIC)  # set by int8 exports
        if level != BASIC:  # the metadata can only be read from a session: open it again at the checked level
            self.session = open_session(onnxruntime, path, level, providers)
        self.image_size, self.crop_size = int(meta["dinomaly.image_size"]), int(meta["dinomaly.crop_size"])
        self.thresholds = json.loads(meta["dinomaly.image_thresholds"])
        self.colour_scales = json.loads(meta["dinomaly.colour_scale"])
        self.score_scales = json.loads(meta.get("dinomaly.normalization", "{}"))  # older exports have none
        self.image_by_image = meta.get("dinomaly.precision") == "int8"

    def __call__(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Maps and scores of a batch. An int8 model runs image by image, as export.py checked it: it quantizes
        each activation with one scale per tensor, so in a batch an image's score would move (up to 3% measured)
        with the images beside it."""
        if not self.image_by_image:
            maps, scores = self.session.run(None, {"images": batch})
            return maps, scores
        maps, scores = zip(*(self.session.run(None, {"images": batch[i:i + 1]}) for i in range(len(batch))))
        return np.concatenate(maps), np.concatenate(scores)


def pick_class(class_name: Optional[str], stored: dict, flag: str) -> str:
    """`class_name`, or the only class `stored` has; else a UserError naming `flag` and the classes."""
    if class_name is None and len(stored) == 1:
        return next(iter(stored))
    if class_name not in stored:
        raise UserError(f"{flag} needs --class_name, one of: {', '.join(stored) or '(none stored)'}")
    return class_name


def pick_threshold(value: Optional[str], class_name: Optional[str], thresholds: dict[str, float]) -> Optional[float]:
    """None, a number, or 'f1': the image F1-max threshold stored for `class_name` (the only class when
    there is one). predict.py decides the same way."""
    if value is None:
        return None
    if value != "f1":
        try:
            return float(value)
        except ValueError:
            raise UserError(f"--threshold must be a number or 'f1', got '{value}'") from None
    return thresholds[pick_class(class_name, thresholds, "--threshold f1")]


def pick_score_scale(class_name: Optional[str], scales: dict[str, dict], source: str) -> dict[str, list[float]]:
    """The --normalize scale of `class_name` (image and pixel min, threshold, max); one line when `source`
    (a checkpoint or model written before the scale was stored) has none."""
    if not scales:
        raise UserError(f"--normalize: {source} stores no score scale (written before --normalize existed); "
                        "train it again with this version, or score without --normalize")
    return scales[pick_class(class_name, scales, "--normalize")]


def normalize(values, scale: list[float]) -> np.ndarray:
    """Scores or map values to [0, 1] by a stored (min, F1-max threshold, max): [min, threshold] goes
    linearly to [0, 0.5], [threshold, max] to [0.5, 1], and what lies outside is clipped. Monotone, and
    the threshold lands on 0.5 exactly, so `normalised >= 0.5` is the stored F1-max verdict. (anomalib's
    min-max normaliser also puts the threshold at 0.5, with one slope, 1 / (max - min), on both sides.)"""
    low, threshold, high = scale
    values = np.asarray(values, dtype=np.float64)
    below = 0.5 * (values - low) / max(threshold - low, 1e-12)
    above = 0.5 + 0.5 * (values - threshold) / max(high - threshold, 1e-12)
    return np.clip(np.where(values < threshold, below, above), 0.0, 1.0)


def shown(score: float, amap: np.ndarray, score_scale: Optional[dict], colour_scale: Optional[tuple[float, float]]
          ) -> tuple[float, np.ndarray, float, float]:
    """The score and map as written, normalised with `score_scale` (--normalize) or raw, and the heatmap's
    colour range: [0, 1] normalised, else the stored test-set range (or the map's own). predict.py shows
    them the same way."""
    if score_scale is not None:
        return float(normalize(score, score_scale["image"])), normalize(amap, score_scale["pixel"]), 0.0, 1.0
    vmin, vmax = colour_scale or (float(amap.min()), float(amap.max()))
    return score, amap, vmin, vmax


def pick_colour_scale(class_name: Optional[str], scales: dict[str, tuple[float, float]]) -> Optional[tuple[float, float]]:
    """The maps' range on the test set of the class (or of all classes) at the run's last evaluation."""
    chosen = [scales[class_name]] if class_name in scales else list(scales.values())
    return (min(s[0] for s in chosen), max(s[1] for s in chosen)) if chosen else None


def output_folder(path: Path) -> Path:
    for parent in (path, *path.parents):
        if parent.exists():
            if not parent.is_dir():
                raise UserError(f"--out {path}: {parent} is a file, expected a folder")
            break
    return path


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     allow_abbrev=False)
    parser.add_argument("--model", required=True, help="a .onnx file written by export.py")
    parser.add_argument("--images", required=True, help="an image file or a folder (searched recursively)")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--threshold", help="a score value, or 'f1' for the threshold stored in the model")
    parser.add_argument("--class_name", help="which class's stored threshold and colour scale to use")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--no_heatmaps", action="store_true", help="write only scores.csv")
    parser.add_argument("--normalize", action="store_true", help=NORMALIZE_HELP)
    args = parser.parse_args(argv)

    model = ExportedModel(Path(args.model))
    score_scale = pick_score_scale(args.class_name, model.score_scales, args.model) if args.normalize else None
    threshold = pick_threshold(args.threshold, args.class_name,
                               dict.fromkeys(model.score_scales, 0.5) if args.normalize else model.thresholds)
    root = Path(args.images)
    paths = find_images(root)
    out = output_folder(Path(args.out))
    out.mkdir(parents=True, exist_ok=True)
    scale = pick_colour_scale(args.class_name, model.colour_scales)

    rows, failed = [], []
    for start in range(0, len(paths), args.batch_size):
        batch, crops = [], []
        for path in paths[start:start + args.batch_size]:
            image = read_rgb(path)
            if image is None:
                failed.append(path)
                continue
            crops.append(preprocess(image, model.image_size, model.crop_size))
            batch.append(path)
        if not batch:
            continue
        maps, scores = model(np.stack(crops))
        for path, crop, amap, raw_score in zip(batch, crops, maps, scores.tolist()):
            score, amap, vmin, vmax = shown(raw_score, amap, score_scale, scale)
            rows.append((path, score, raw_score))
            if not args.no_heatmaps:
                verdict = "" if threshold is None else ("  ANOMALOUS" if score >= threshold else "  normal")
                panel = heatmap_panel(crop, amap, vmin, vmax, f"{path.name}  score {score:.4f}{verdict}")
                target = out / "heatmaps" / output_name(path, root)
                target.parent.mkdir(parents=True, exist_ok=True)
                if not cv2.imwrite(str(target), np.ascontiguousarray(panel[..., ::-1])):
                    raise UserError(f"could not write {target}")

    return write_scores(out, rows, [(path, "not an image OpenCV can decode") for path in failed], threshold,
                        args.normalize)


def write_scores(out: Path, rows: list[tuple[Path, float, float]], failed: list[tuple[Path, str]],
                 threshold: Optional[float], normalized: bool = False) -> int:
    """<out>/scores.csv (file, score[, raw_score when `normalized`][, anomalous]) from rows (file, score as
    shown, raw score), the unreadable files on stderr, a summary line; the exit status (1 when no image
    could be scored). predict.py reports the same way."""
    with open(out / "scores.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["file", "score"] + (["raw_score"] if normalized else [])
                        + ([] if threshold is None else ["anomalous"]))
        for path, score, raw_score in rows:
            writer.writerow([str(path), f"{score:.6f}"] + ([f"{raw_score:.6f}"] if normalized else [])
                            + ([] if threshold is None else [int(score >= threshold)]))
    for path, reason in failed:
        print(f"could not read {path}: {reason}", file=sys.stderr)
    summary = f"{len(rows)} images scored, {len(failed)} unreadable; results in {out}"
    if threshold is not None:
        summary += f"; threshold {threshold:.6f}: {sum(row[1] >= threshold for row in rows)} anomalous"
    print(summary)
    return 0 if rows else 1


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv[1:]))
    except (UserError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(1)
