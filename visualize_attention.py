"""The paper's attention figure: where each decoder block looks from chosen query points, beside the frozen
encoder's softmax attention at the layer that block reconstructs.

    python visualize_attention.py --checkpoint runs/mvtec_uni_.../checkpoint.pth --image bottle/test/broken_large/000.png \
        --points 200,350 640,500 --output attention.png
    python visualize_attention.py --checkpoint runs/mvtec_uni_... --image IMG --points 100,100   # a run directory works too

--points are x,y pixel coordinates of the input image as stored (before the resize and centre crop); each
selects the patch under it as the query. The PNG has two rows per point: the decoder's blocks 0..D-1
(linear attention: the effective weights phi(q)phi(k)^T / normaliser; softmax in the softmax ablation),
and under each the encoder block it reconstructs (softmax). A cell shows the query's weights over the
patch grid, averaged over heads, on the cropped image the model sees, scaled to the cell's own maximum; its
caption gives the block and the share of the weight that went to the class and register tokens instead.
See models/attention_maps.py for the weights and the pairing of decoder and encoder blocks.
"""
import argparse
import sys
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from datasets import load_image
from datasets.transforms import image_transform
from models import input_normalization
from models.attention_maps import BlockAttention, block_attention
from predict_onnx import UserError
from utils.checkpoint import load_checkpoint, model_from_checkpoint
from utils.config import add_config_flags, collect_overrides, parse_known, validate
from utils.device import resolve_device
from utils.run_setup import output_folder, run_cli
from utils.visualize import heatmap_overlay, to_display_image

SCRIPT_ERRORS = (UserError,)
KEYS = ("device", "encoder_weights", "weights_dir")
CELL = 160  # pixels per panel


def parse_point(text: str) -> tuple[float, float]:
    try:
        x, y = (float(v) for v in text.split(","))
    except ValueError:
        raise UserError(f"--points: expected x,y pixel coordinates such as 120,200, got '{text}'") from None
    return x, y


def query_patch(point: tuple[float, float], image_size: tuple[int, int], cfg: dict, patch: int) -> tuple[int, int]:
    """(row, column) on the patch grid of the pixel `point` of an image of `image_size` (width, height): the
    point follows the Resize((image_size, image_size)) and the CenterCrop(crop_size) of the transform."""
    (x, y), (width, height) = point, image_size
    if not (0 <= x < width and 0 <= y < height):
        raise UserError(f"--points {x:g},{y:g} lies outside the {width}x{height} image")
    offset = int(round((cfg["image_size"] - cfg["crop_size"]) / 2.0))  # torchvision's CenterCrop
    column, row = x * cfg["image_size"] / width - offset, y * cfg["image_size"] / height - offset
    if not (0 <= column < cfg["crop_size"] and 0 <= row < cfg["crop_size"]):
        keep = offset / cfg["image_size"]
        raise UserError(f"--points {x:g},{y:g} falls outside the centre crop the model sees (x in "
                        f"{keep * width:.0f}..{(1 - keep) * width:.0f}, y in {keep * height:.0f}..{(1 - keep) * height:.0f})")
    return int(row // patch), int(column // patch)


def cell(display: np.ndarray, weights: torch.Tensor, token: int, prefix: int, grid: tuple[int, int],
         marker: tuple[int, int], caption: str) -> np.ndarray:
    """The query's weights over the patch grid blended over the image, the query marked, a caption on top."""
    row = weights[token]
    on_patches = row[prefix:].reshape(1, 1, *grid).float()
    amap = F.interpolate(on_patches, size=display.shape[:2], mode="nearest")[0, 0].numpy()
    panel = heatmap_overlay(display, amap, 0.0, float(amap.max()), alpha=0.6)
    cv2.drawMarker(panel, marker, (255, 255, 255), cv2.MARKER_CROSS, 14, 2)
    text = f"{caption}  pre {float(row[:prefix].sum()):.0%}" if prefix else caption
    header = np.full((18, panel.shape[1], 3), 255, np.uint8)
    cv2.putText(header, text, (3, 13), cv2.FONT_HERSHEY_SIMPLEX, 0.38, (0, 0, 0), 1, cv2.LINE_AA)
    return np.concatenate([header, panel], axis=0)


def figure(display: np.ndarray, blocks: list[BlockAttention], queries: list[tuple[int, int]], prefix: int,
           grid: tuple[int, int], patch_pixels: float) -> np.ndarray:
    """Two rows per query (decoder blocks, their encoder blocks), one column per decoder block."""
    blank = np.full((display.shape[0] + 18, display.shape[1], 3), 255, np.uint8)
    rows = []
    for row, column in queries:
        token = prefix + row * grid[1] + column
        marker = (int((column + 0.5) * patch_pixels), int((row + 0.5) * patch_pixels))
        rows.append([cell(display, b.decoder[0], token, prefix, grid, marker, f"decoder {b.decoder_block}")
                     for b in blocks])
        rows.append([blank if b.encoder is None else
                     cell(display, b.encoder[0], token, prefix, grid, marker, f"encoder {b.encoder_block}")
                     for b in blocks])
    gap = lambda n: np.full((n[0], 4, 3), 255, np.uint8)
    lines = [np.concatenate([p for panel in line for p in (panel, gap(panel.shape))][:-1], axis=1) for line in rows]
    return np.concatenate([p for line in lines for p in (line, np.full((4, line.shape[1], 3), 255, np.uint8))][:-1])


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     allow_abbrev=False)
    parser.add_argument("--checkpoint", required=True, help="a checkpoint.pth written by training, or its run directory")
    parser.add_argument("--image", required=True, help="the image to look at")
    parser.add_argument("--points", required=True, nargs="+", metavar="X,Y", help="query points, pixels of --image")
    parser.add_argument("--output", default="attention.png", help="the PNG to write")
    add_config_flags(parser, KEYS)
    args = parse_known(parser, argv)

    points = [parse_point(text) for text in args.points]
    checkpoint = load_checkpoint(Path(args.checkpoint))
    cfg = validate({**checkpoint["config"], **collect_overrides(args, KEYS)}, "checkpoint config + command line")
    if cfg["attention"] == "conv":
        raise UserError(f"{checkpoint['path']} was trained with attention: conv; the conv mixer has no attention to draw")
    output = Path(args.output)
    output_folder(output.parent, "--output")
    image = load_image(Path(args.image))
    model = model_from_checkpoint(checkpoint, cfg).to(resolve_device(cfg["device"]))
    patch, prefix = model.encoder.patch_size, model.encoder.num_prefix_tokens
    grid = (cfg["crop_size"] // patch,) * 2
    queries = [query_patch(point, image.size, cfg, patch) for point in points]
    normalization = input_normalization(cfg)
    tensor = image_transform(cfg["image_size"], cfg["crop_size"], *normalization)(image)
    blocks = block_attention(model, tensor[None].to(next(model.parameters()).device))
    blocks = [BlockAttention(b.decoder_block, b.decoder.cpu(), b.encoder_block,
                             None if b.encoder is None else b.encoder.cpu()) for b in blocks]
    display = to_display_image(tensor, CELL, *normalization)
    grid_image = figure(display, blocks, queries, prefix, grid, CELL / grid[0])
    output.parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(output), np.ascontiguousarray(grid_image[..., ::-1])):
        raise UserError(f"could not write {output}")
    print(f"attention of {len(queries)} point(s) over {len(blocks)} decoder blocks written to {output}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main, sys.argv[1:], SCRIPT_ERRORS))
