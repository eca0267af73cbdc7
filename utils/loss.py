"""The 'loose loss': global cosine distance per group, with hard-mining gradient scaling."""
from typing import Sequence

import torch
import torch.nn.functional as F

from .distributed import gather_cat


def hard_mining_p(it: int, p_final: float = 0.9, ramp_iters: int = 1000) -> float:
    """Share of positions treated as 'easy': 0 at the first step, rising linearly to p_final."""
    return min(p_final * it / ramp_iters, p_final)


def _scale_easy_gradients(decoder_map: torch.Tensor, distance: torch.Tensor, p: float, factor: float) -> None:
    """Multiply the gradient reaching `decoder_map` by `factor` wherever the distance is below the
    k-th largest distance, k = int(numel * (1 - p)): training focuses on the hardest positions.
    Under torchrun the distances of the whole global batch set the threshold."""
    everywhere = gather_cat(distance)
    k = max(int(everywhere.numel() * (1 - p)), 1)
    threshold = torch.topk(everywhere.reshape(-1), k=k).values[-1]
    scale = torch.where(distance < threshold, factor, 1.0).to(decoder_map.dtype)
    decoder_map.register_hook(lambda grad: grad * scale)


def global_cosine_hm(encoder_maps: Sequence[torch.Tensor], decoder_maps: Sequence[torch.Tensor],
                     p: float, factor: float = 0.1) -> torch.Tensor:
    """Mean over groups of mean_b (1 - cos(flatten(en_b), flatten(de_b))), computed in fp32."""
    loss = 0.0
    for en, de in zip(encoder_maps, decoder_maps):
        en = en.detach().float()
        de = de.float()
        with torch.no_grad():
            distance = 1 - F.cosine_similarity(en, de, dim=1).unsqueeze(1)
        loss = loss + torch.mean(1 - F.cosine_similarity(en.flatten(1), de.flatten(1), dim=1))
        if de.requires_grad:
            _scale_easy_gradients(de, distance, p, factor)
    return loss / len(encoder_maps)
