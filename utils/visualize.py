"""Heatmap overlays written with opencv: what the model sees, next to the image and the ground truth."""
from pathlib import Path
from typing import Optional, Sequence

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from models import input_normalization


def to_display_image(image: torch.Tensor, size: int, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """A 3 x H x W tensor normalised with `mean`/`std` back to a size x size uint8 RGB array."""
    mean = torch.tensor(mean).view(3, 1, 1)
    std = torch.tensor(std).view(3, 1, 1)
    rgb = (image.cpu().float() * std + mean).clamp(0, 1).unsqueeze(0)
    rgb = F.interpolate(rgb, size=size, mode="bilinear", align_corners=False)[0]
    return (rgb.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)


def heatmap_overlay(rgb: np.ndarray, amap: np.ndarray, vmin: float, vmax: float, alpha: float = 0.5) -> np.ndarray:
    """Jet-coloured anomaly map, scaled to [vmin, vmax], blended over the image."""
    scaled = np.clip((amap - vmin) / max(vmax - vmin, 1e-12), 0, 1)
    colored = cv2.applyColorMap((scaled * 255).astype(np.uint8), cv2.COLORMAP_JET)[..., ::-1]
    return (alpha * colored + (1 - alpha) * rgb).round().astype(np.uint8)


def panel(rgb: np.ndarray, amap: np.ndarray, vmin: float, vmax: float, mask: Optional[np.ndarray] = None,
          title: str = "") -> np.ndarray:
    """image | ground truth (when given) | heatmap overlay as one RGB array, with an optional caption."""
    panels = [rgb]
    if mask is not None:
        panels.append(np.repeat((mask.astype(np.uint8) * 255)[..., None], 3, axis=2))
    panels.append(heatmap_overlay(rgb, amap, vmin, vmax))
    separator = np.full((rgb.shape[0], 4, 3), 255, np.uint8)
    row = np.concatenate([p for panel in panels for p in (panel, separator)][:-1], axis=1)
    if title:
        row = np.concatenate([np.full((22, row.shape[1], 3), 255, np.uint8), row], axis=0)
        cv2.putText(row, title, (4, 16), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (0, 0, 0), 1, cv2.LINE_AA)
    return row


def sample_panel(dataset, outputs, index: int, cfg: dict, vmin: float, vmax: float) -> np.ndarray:
    """The panel of test image `index` of a class (a TestSet and its ClassOutputs), captioned with its
    defect, file name and score."""
    sample = dataset.samples[index]
    rgb = to_display_image(dataset[index][0][:3], cfg["map_size"], *input_normalization(cfg))  # RGB of RGB-D
    title = f"{sample.defect}/{sample.image.name}  score {float(outputs.scores[index]):.4f}"
    mask = None if outputs.masks is None else outputs.masks[index].cpu().numpy()
    return panel(rgb, outputs.maps[index].cpu().numpy(), vmin, vmax, mask, title)


def save_panel(path: Path, rgb: np.ndarray, amap: np.ndarray, vmin: float, vmax: float,
               mask: Optional[np.ndarray] = None, title: str = "") -> None:
    """PNG of `panel`."""
    write_png(path, panel(rgb, amap, vmin, vmax, mask, title))


def write_png(path: Path, rgb: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(path), np.ascontiguousarray(rgb[..., ::-1])):
        raise OSError(f"could not write {path}")
