"""ADViT as its repository releases it, and the association discrepancy its README describes.

The released code (zsgyj1996/ADViT, the VT-ADL model of pankajmishra000/VT-ADL) is what
`association: none` computes, part by part:
  - ViT on square patches (student_transformer.py): linear patch embedding, class token, learned position
    embedding, pre-norm blocks; the attention scales its logits by the full width ** -0.5 (not the head's);
    the all-ones mask the released model passes changes nothing and is left out; the class token is dropped;
  - Gaussian noise (sd 0.2) on the encoded patches while training (VT_AE.add_noise);
  - one capsule layer with 3 routing iterations (spatial.DigitCaps). Its softmax runs over the output
    capsules and there is one, so every coupling coefficient is 1 and the routing never changes the
    result: the output is squash(sum of W x). We run the loop as released anyway;
  - transposed convolutions back to pixels (model_res18.decoder2), Tanh at the end;
  - a mixture density network over the patch features (mdn1.MDN) whose input is clamped at machine eps;
    its "sigma_sq" (a softplus) is used as a log-variance, and mdn1.log_gmm weights each Gaussian's
    negative log-likelihood by its mixture weight and sums, instead of -log sum_k pi_k N_k; log(2 pi) is
    added once, not per dimension. We compute these as released and call the result the patch NLL;
  - loss 5 MSE - 0.5 SSIM (pytorch_ssim: 11 x 11 Gaussian window, sigma 1.5) + the batch mean of the
    patch NLL summed over patches;
  - anomaly map: the patch NLL on the grid, bilinear (align_corners) to the crop, Gaussian sigma 4
    (scipy, as utility_fun.Filter).
`association: discrepancy` adds the Anomaly Transformer's association discrepancy (thuml/Anomaly-Transformer,
model/attn.py, solver.py) on the 2-D patch grid: see `gaussian_prior`, `association_losses`,
`discrepancy`. The model takes our normalised images and undoes the normalisation first: the released
model sees [0, 1] pixels.
"""
import math
from typing import Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from scipy.ndimage import gaussian_filter

from . import input_normalization

CAPSULE_DIM = 8                  # each input capsule: 8 consecutive numbers of the encoded patches
CAPSULE_OUT = 512                # the one output capsule, seen by the decoder as ...
DECODER_CHANNELS, DECODER_SIDE = 8, 8  # ... 8 channels of 8 x 8
ROUTING_ITERATIONS = 3
MAP_SIGMA = 4.0                  # utility_fun.Filter: scipy gaussian_filter(sigma=4) on the crop-sized map
KL_EPS = 1e-4                    # Anomaly Transformer's my_kl_loss


def squash(s: torch.Tensor) -> torch.Tensor:
    """|s|^2 / (1 + |s|^2) * s / |s| over the last dimension, written as spatial.DigitCaps.squash."""
    squared = (s ** 2).sum(-1, keepdim=True)
    return squared * s / ((1. + squared) * torch.sqrt(squared))


class DigitCaps(nn.Module):
    """spatial.DigitCaps: dynamic routing from `in_caps` capsules of CAPSULE_DIM to `out_caps` capsules of
    `out_dim`; the longest output capsule is passed on (B x out_dim)."""

    def __init__(self, in_caps: int, out_caps: int = 1, out_dim: int = CAPSULE_OUT):
        super().__init__()
        self.W = nn.Parameter(0.01 * torch.randn(out_caps, in_caps, out_dim, CAPSULE_DIM))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_hat = torch.matmul(self.W, x[:, None, :, :, None]).squeeze(-1)  # B x out x in x out_dim
        detached = x_hat.detach()
        logits = x.new_zeros(x.shape[0], self.W.shape[0], self.W.shape[1])
        for i in range(ROUTING_ITERATIONS):
            coupling = logits.softmax(dim=1)  # over the output capsules
            if i == ROUTING_ITERATIONS - 1:
                outputs = squash((coupling[..., None] * x_hat).sum(-2, keepdim=True))
            else:
                outputs = squash((coupling[..., None] * detached).sum(-2, keepdim=True))
                logits = logits + (outputs * detached).sum(-1)
        outputs = outputs.squeeze(-2)
        longest = outputs.norm(dim=-1).softmax(dim=1).argmax(dim=1)
        return outputs[torch.arange(x.shape[0], device=x.device), longest]


def patch_distances(grid: int) -> torch.Tensor:
    """L x L Euclidean distances between the patches of a grid x grid layout (row-major), in patches:
    the 2-D counterpart of the Anomaly Transformer's |i - j| between time steps."""
    rows, cols = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")
    points = torch.stack([rows.flatten(), cols.flatten()], dim=1).float()
    return torch.cdist(points, points)


def gaussian_prior(sigma_logits: torch.Tensor, distances: torch.Tensor) -> torch.Tensor:
    """B x H x L x L prior association, each row a distribution: a Gaussian kernel of the patch distance,
    its width learned per patch and head, transformed as attn.AnomalyAttention does
    (sigmoid(5 s) + 1e-5, then 3^sigma - 1), normalised over each row as solver.py does."""
    sigma = torch.sigmoid(sigma_logits.transpose(1, 2) * 5) + 1e-5  # B x H x L
    sigma = (torch.pow(3, sigma) - 1)[..., None]
    prior = 1.0 / (math.sqrt(2 * math.pi) * sigma) * torch.exp(-distances ** 2 / 2 / sigma ** 2)
    return prior / prior.sum(-1, keepdim=True)


def patch_series(attention: torch.Tensor) -> torch.Tensor:
    """The series association of the patches: the attention among patch tokens (class token left out),
    each row renormalised to a distribution (our choice: the prior has no place for the class token)."""
    series = attention[:, :, 1:, 1:]
    return series / series.sum(-1, keepdim=True)


class Attention(nn.Module):
    """student_transformer.Attention; with `grid`, also the prior of each patch (AttentionLayer's
    sigma_projection reads the attention's input)."""

    def __init__(self, dim: int, heads: int, grid: Optional[int]):
        super().__init__()
        self.heads = heads
        self.scale = dim ** -0.5
        self.to_qkv = nn.Linear(dim, dim * 3, bias=False)
        self.to_out = nn.Linear(dim, dim)
        self.sigma = nn.Linear(dim, heads) if grid else None
        if grid:
            self.register_buffer("distances", patch_distances(grid), persistent=False)

    def forward(self, x: torch.Tensor):
        b, n, d = x.shape
        q, k, v = self.to_qkv(x).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        attention = (q @ k.transpose(-2, -1) * self.scale).softmax(dim=-1)
        out = self.to_out((attention @ v).transpose(1, 2).reshape(b, n, d))
        if self.sigma is None:
            return out, None
        return out, (patch_series(attention), gaussian_prior(self.sigma(x[:, 1:]), self.distances))


class Block(nn.Module):
    """Residual(PreNorm(attention)), Residual(PreNorm(Linear, GELU, Linear))."""

    def __init__(self, dim: int, heads: int, mlp: int, grid: Optional[int]):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads, grid)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp), nn.GELU(), nn.Linear(mlp, dim))

    def forward(self, x: torch.Tensor):
        out, association = self.attn(self.norm1(x))
        x = out + x
        return self.mlp(self.norm2(x)) + x, association


class PatchViT(nn.Module):
    """student_transformer.ViT: B x 3 x S x S pixels -> B x L x dim encoded patches (class token dropped),
    and per block the (series, prior) pair when the association discrepancy is on."""

    def __init__(self, image: int, patch: int, dim: int, depth: int, heads: int, mlp: int, association: bool):
        super().__init__()
        grid = image // patch
        self.patch = patch
        self.pos_embedding = nn.Parameter(torch.randn(1, grid * grid + 1, dim))
        self.patch_to_embedding = nn.Linear(3 * patch * patch, dim)
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim))
        self.blocks = nn.ModuleList(Block(dim, heads, mlp, grid if association else None) for _ in range(depth))

    def forward(self, pixels: torch.Tensor):
        b, c, h, w = pixels.shape
        p = self.patch
        x = pixels.view(b, c, h // p, p, w // p, p).permute(0, 2, 4, 3, 5, 1).reshape(b, -1, p * p * c)
        x = self.patch_to_embedding(x)
        x = torch.cat([self.cls_token.expand(b, -1, -1), x], dim=1) + self.pos_embedding[:, :x.shape[1] + 1]
        associations = []
        for block in self.blocks:
            x, association = block(x)
            associations.append(association)
        return x[:, 1:], associations if associations[0] is not None else []


def build_decoder(layers: list[list[int]]) -> nn.Sequential:
    """model_res18.decoder2: ConvTranspose2d layers (out channels, kernel, stride, padding) from the
    8-channel 8 x 8 capsule, BatchNorm + ReLU after each but the last, Tanh at the end."""
    modules, channels = [], DECODER_CHANNELS
    for i, (out, kernel, stride, padding) in enumerate(layers):
        modules.append(nn.ConvTranspose2d(channels, out, kernel, stride=stride, padding=padding))
        modules += [nn.BatchNorm2d(out), nn.ReLU(True)] if i < len(layers) - 1 else [nn.Tanh()]
        channels = out
    return nn.Sequential(*modules)


def decoder_output_size(layers: list[list[int]]) -> int:
    side = DECODER_SIDE
    for _, kernel, stride, padding in layers:
        side = (side - 1) * stride - 2 * padding + kernel
    return side


class MixtureDensity(nn.Module):
    """mdn1.MDN: mixture weights, means and "sigma_sq" (a softplus, used as log-variance) per patch."""

    def __init__(self, dim: int, gaussians: int):
        super().__init__()
        self.pi = nn.Linear(dim, gaussians, bias=False)
        self.mu = nn.Linear(dim, dim * gaussians, bias=False)
        self.sigma_sq = nn.Linear(dim, dim * gaussians, bias=False)

    def forward(self, x: torch.Tensor):
        x = torch.clamp(x, np.finfo(float).eps)
        b, n, d = x.shape
        return (F.softmax(self.pi(x), dim=-1), self.mu(x).view(b, n, d, -1),
                F.softplus(self.sigma_sq(x)).view(b, n, d, -1))


def patch_nll(x: torch.Tensor, pi: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """B x L: mdn1.log_gmm(total=True), sum_k pi_k * 0.5 (log 2 pi + sum_d logvar + (x - mu)^2 / exp(logvar)),
    the released weighting of the Gaussians' negative log-likelihoods (not a log-sum-exp)."""
    a = (x[..., None] - mu) ** 2
    nll = -(-0.5 * (np.log(2 * np.pi) + (logvar + a / torch.exp(logvar)).sum(2)))
    return (pi * nll).sum(-1)


def ssim(img1: torch.Tensor, img2: torch.Tensor, window_size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    """pytorch_ssim.SSIM(): per-channel Gaussian window, zero padding, C1 = 0.01^2, C2 = 0.03^2, mean."""
    channels = img1.shape[1]
    gauss = torch.tensor([math.exp(-(x - window_size // 2) ** 2 / float(2 * sigma ** 2)) for x in range(window_size)])
    gauss = (gauss / gauss.sum())[:, None]
    window = (gauss @ gauss.t()).expand(channels, 1, window_size, window_size).contiguous().to(img1)
    blur = lambda t: F.conv2d(t, window, padding=window_size // 2, groups=channels)
    mu1, mu2 = blur(img1), blur(img2)
    mu1_sq, mu2_sq, mu1_mu2 = mu1.pow(2), mu2.pow(2), mu1 * mu2
    sigma1_sq = blur(img1 * img1) - mu1_sq
    sigma2_sq = blur(img2 * img2) - mu2_sq
    sigma12 = blur(img1 * img2) - mu1_mu2
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    ssim_map = ((2 * mu1_mu2 + c1) * (2 * sigma12 + c2)) / ((mu1_sq + mu2_sq + c1) * (sigma1_sq + sigma2_sq + c2))
    return ssim_map.mean()


def kl_per_patch(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """B x L: solver.my_kl_loss, sum over the last axis of p (log(p + 1e-4) - log(q + 1e-4)), mean over heads."""
    return torch.mean(torch.sum(p * (torch.log(p + KL_EPS) - torch.log(q + KL_EPS)), dim=-1), dim=1)


def association_losses(associations: list) -> tuple[torch.Tensor, torch.Tensor]:
    """solver.py's two terms, each the symmetric KL averaged over patches, batch and layers:
    series_loss with the prior detached (phase 1 maximises it: only the attention moves), prior_loss with
    the series detached (phase 2 minimises it: only the prior's widths and what feeds them move)."""
    series_loss = sum(kl_per_patch(s, p.detach()).mean() + kl_per_patch(p.detach(), s).mean() for s, p in associations)
    prior_loss = sum(kl_per_patch(p, s.detach()).mean() + kl_per_patch(s.detach(), p).mean() for s, p in associations)
    return series_loss / len(associations), prior_loss / len(associations)


def discrepancy(associations: list, temperature: float) -> torch.Tensor:
    """B x L association discrepancy at test (solver.test): sum over layers of KL(series||prior) +
    KL(prior||series), times the temperature (50)."""
    return sum((kl_per_patch(s, p) + kl_per_patch(p, s)) * temperature for s, p in associations)


def initialize_weights(*modules: nn.Module) -> None:
    """VT_AE.initialize_weights: Kaiming-normal Linear/Conv2d weights, zero biases, BatchNorm 1/0. The
    released decoder has only ConvTranspose2d layers, which keep PyTorch's default initialisation."""
    for module in modules:
        for m in module.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight)
                if m.bias is not None:
                    m.bias.data.zero_()
            elif isinstance(m, nn.BatchNorm2d):
                m.weight.data.fill_(1)
                m.bias.data.zero_()


class ADViT(nn.Module):
    """ViT -> (noise) -> capsule -> decoder, and the mixture density network over the encoded patches."""

    TRAINABLE_PARTS = ("vit", "caps", "decoder", "mdn")  # all of it: ADViT has no frozen encoder

    def __init__(self, cfg: dict):
        super().__init__()
        dim, crop, patch = cfg["vit_dim"], cfg["crop_size"], cfg["patch_size"]
        self.noise_sd = cfg["noise_sd"]
        self.temperature = cfg["association_temperature"]
        self.vit = PatchViT(crop, patch, dim, cfg["vit_depth"], cfg["vit_heads"], cfg["vit_mlp"],
                            cfg["association"] == "discrepancy")
        self.decoder = build_decoder(cfg["decoder_layers"])
        self.caps = DigitCaps(in_caps=(crop // patch) ** 2 * dim // CAPSULE_DIM)
        initialize_weights(self.vit, self.decoder)
        self.mdn = MixtureDensity(dim, cfg["mdn_gaussians"])
        mean, std = input_normalization(cfg)
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        return self.state_dict()

    def forward(self, images: torch.Tensor):
        """(pixels in [0, 1], encoded patches B x L x dim (noisy while training), reconstruction, the
        (series, prior) pair of every block or [] without the association discrepancy)."""
        pixels = images * self.std + self.mean
        encoded, associations = self.vit(pixels)
        if self.training and self.noise_sd > 0:
            encoded = encoded + torch.randn_like(encoded) * self.noise_sd
        b = encoded.shape[0]
        latent = self.caps(encoded.reshape(b, -1, CAPSULE_DIM))
        reconstruction = self.decoder(latent.view(b, DECODER_CHANNELS, DECODER_SIDE, DECODER_SIDE))
        return pixels, encoded, reconstruction, associations

    def patch_scores(self, images: torch.Tensor) -> torch.Tensor:
        """B x L: the patch NLL (released), weighted by softmax(-discrepancy) over the patches with the
        association discrepancy (as the Anomaly Transformer weights its criterion)."""
        _, encoded, _, associations = self(images)
        scores = patch_nll(encoded, *self.mdn(encoded))
        if associations:
            scores = torch.softmax(-discrepancy(associations, self.temperature), dim=-1) * scores
        return scores

    @torch.no_grad()
    def anomaly_map(self, images: torch.Tensor, size: int) -> torch.Tensor:
        """B x size x size: patch scores bilinear (align_corners) to the crop, the released Gaussian
        filter (sigma 4, scipy's reflect border) there, then bilinear to `size` (our protocol's map size)."""
        scores = self.patch_scores(images)
        grid = int(round(scores.shape[1] ** 0.5))
        maps = F.interpolate(scores.view(-1, 1, grid, grid), size=images.shape[-1], mode="bilinear", align_corners=True)
        smooth = np.stack([gaussian_filter(m, sigma=MAP_SIGMA) for m in maps[:, 0].float().cpu().numpy()])
        maps = torch.from_numpy(smooth).to(images.device)[:, None]
        return F.interpolate(maps, size=size, mode="bilinear", align_corners=False)[:, 0]


def advit_loss(model: ADViT, images: torch.Tensor, cfg: dict) -> tuple[torch.Tensor, list]:
    """train.py's loss, 5 MSE + 0.5 (-SSIM) + NLL (weights mse_weight, ssim_weight), and the associations."""
    pixels, encoded, reconstruction, associations = model(images)
    mse = F.mse_loss(reconstruction, pixels, reduction="mean")
    nll = torch.mean(torch.sum(patch_nll(encoded, *model.mdn(encoded)), 1))
    return cfg["mse_weight"] * mse + cfg["ssim_weight"] * -ssim(pixels, reconstruction) + nll, associations
