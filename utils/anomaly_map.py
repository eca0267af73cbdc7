"""From encoder/decoder features to anomaly maps and image scores (RECIPE section 5)."""
import math
from typing import Sequence

import torch
import torch.nn.functional as F


def gaussian_kernel(size: int = 5, sigma: float = 4.0) -> torch.Tensor:
    coords = torch.arange(size, dtype=torch.float32) - (size - 1) / 2
    grid = coords[None, :] ** 2 + coords[:, None] ** 2
    kernel = torch.exp(-grid / (2 * sigma ** 2)) / (2 * math.pi * sigma ** 2)
    return (kernel / kernel.sum()).view(1, 1, size, size)


def anomaly_maps(encoder_maps: Sequence[torch.Tensor], decoder_maps: Sequence[torch.Tensor],
                 input_size: int, out_size: int = 256, sigma: float = 4.0) -> torch.Tensor:
    """B x 1 x out_size x out_size: per group 1 - cos over channels, bilinear (align_corners=True) to the
    input size, mean over groups, bilinear to out_size, then a 5x5 Gaussian with zero padding."""
    per_group = []
    for en, de in zip(encoder_maps, decoder_maps):
        distance = 1 - F.cosine_similarity(en.float(), de.float(), dim=1).unsqueeze(1)
        per_group.append(F.interpolate(distance, size=input_size, mode="bilinear", align_corners=True))
    amap = torch.cat(per_group, dim=1).mean(dim=1, keepdim=True)
    amap = F.interpolate(amap, size=out_size, mode="bilinear", align_corners=False)
    kernel = gaussian_kernel(5, sigma).to(amap.device)
    return F.conv2d(amap, kernel, padding=2)


def image_scores(maps: torch.Tensor, max_ratio: float = 0.01) -> torch.Tensor:
    """Mean of the top `max_ratio` share of each map's pixels (the maximum when max_ratio is 0)."""
    flat = maps.flatten(1)
    k = int(flat.shape[1] * max_ratio)
    if k == 0:
        return flat.max(dim=1).values
    return torch.topk(flat, k, dim=1).values.mean(dim=1)
