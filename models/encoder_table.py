"""The encoder table: each registered name with its architecture, its official file (URL or how to get it,
sha256 where known, the layout of the weights inside) and the input statistics it was trained with.

Nothing here builds or loads a network: models/registry.py does, from these specs.
"""
import math
from dataclasses import dataclass, field
from typing import Any, Optional

from .encoder_interface import IMAGENET_MEAN, IMAGENET_STD, TIPS_MEAN, TIPS_STD

_URL = "https://dl.fbaipublicfiles.com/dinov2/dinov2_vit{s}14/dinov2_vit{s}14{reg}_pretrain.pth"


@dataclass(frozen=True)
class EncoderSpec:
    """Everything needed to build an encoder and read its official file, without building it.

    The file layout: the weights sit under `checkpoint_key` (None: at the top), their names start with
    `prefix` (removed), and keys matching `dropped` are extras of the real file that the encoder does
    not use (classification heads, decoders, momentum encoders, ...), dropped on purpose. Every other
    key must match the architecture exactly."""
    embed_dim: int
    depth: int
    num_heads: int
    num_register_tokens: int
    ffn: str = "mlp"
    url: Optional[str] = None
    sha256: Optional[str] = None          # the full digest, or the prefix an official file name carries
    patch_size: int = 14
    pos_grid: int = 37                    # side of the position-embedding grid stored in the weights
    mean: tuple[float, float, float] = IMAGENET_MEAN   # the statistics the weights were trained with
    std: tuple[float, float, float] = IMAGENET_STD
    family: str = "dinov2"                # dinov2, dino (DINO v1's ViT), beit, dinov3 or tips
    cache_name: Optional[str] = None      # file name in the cache when the URL's is not unique
    checkpoint_key: Optional[str] = None
    prefix: str = ""
    dropped: tuple[str, ...] = ()         # regular expressions
    how_to_get: str = ""                  # for weights without a download URL
    options: dict[str, Any] = field(default_factory=dict)  # the family constructor's own arguments

    @property
    def file_name(self) -> Optional[str]:
        return self.cache_name or (self.url.rsplit("/", 1)[-1] if self.url else None)


_SIZES = {"small": ("s", 384, 12, 6, "mlp"), "base": ("b", 768, 12, 12, "mlp"),
          "large": ("l", 1024, 24, 16, "mlp"), "giant": ("g", 1536, 40, 24, "swiglu")}
_SHA256 = {
    "dinov2reg_vit_small_14": "f433177089a681826f849f194ece3bb48f4d63fb38d32fc837e3dc7a4e5641fb",
    "dinov2_vit_small_14": "b938bf1bc15cd2ec0feacfe3a1bb553fe8ea9ca46a7e1d8d00217f29aef60cd9",
    "dinov2reg_vit_base_14": "73182a088cf94833c94b1666d1c99e02fe87e2007bff57b564fb6206e25dba71",
}

ENCODERS: dict[str, EncoderSpec] = {}
for _size, (_s, _dim, _depth, _heads, _ffn) in _SIZES.items():
    for _prefix, _reg in (("dinov2reg", 4), ("dinov2", 0)):
        _name = f"{_prefix}_vit_{_size}_14"
        ENCODERS[_name] = EncoderSpec(_dim, _depth, _heads, _reg, _ffn,
                                      _URL.format(s=_s, reg="_reg4" if _reg else ""), _SHA256.get(_name))

# The other foundation models of the paper's Table A4, named and fetched as the reference code
# (guojiajeremy/Dinomaly, models/vit_encoder.py) does. All but BEiT run in DINO v1's ViT, built at 224 px.
_HEAD = r"^head\."
_V1 = dict(family="dino", num_register_tokens=0)
_S16, _B16, _L16 = (dict(embed_dim=384, depth=12, num_heads=6, patch_size=16, pos_grid=14),
                    dict(embed_dim=768, depth=12, num_heads=12, patch_size=16, pos_grid=14),
                    dict(embed_dim=1024, depth=24, num_heads=16, patch_size=16, pos_grid=14))
_DINO = "https://dl.fbaipublicfiles.com/dino/{0}/{0}.pth"
_IBOT = "https://lf3-nlp-opensource.bytetos.com/obj/nlp-opensource/archive/2022/ibot/{0}_rand_mask/checkpoint_teacher.pth"
_IBOT_LAYOUT = dict(checkpoint_key="state_dict", dropped=(_HEAD, r"^masked_embed$"))  # the iBOT head, the MIM token
_MAE_LAYOUT = dict(checkpoint_key="model", dropped=(r"^decoder", r"^mask_token$"))  # MAE's decoder and mask token
# MoCo v3: the query encoder under module.base_encoder.; the momentum encoder, the predictor and the
# projection head are training-only. Its ViT-S has 12 heads; the reference runs it with DINO's 6, as here.
_MOCO_LAYOUT = dict(checkpoint_key="state_dict", prefix="module.base_encoder.",
                    dropped=(r"^module\.momentum_encoder\.", r"^module\.predictor\.", _HEAD))
_BEIT_LAYOUT = dict(family="beit", checkpoint_key="model", dropped=(_HEAD, r"\.relative_position_index$"))
ENCODERS.update({
    "dino_vit_small_16": EncoderSpec(**_S16, **_V1, url=_DINO.format("dino_deitsmall16_pretrain")),
    "dino_vit_base_16": EncoderSpec(**_B16, **_V1, url=_DINO.format("dino_vitbase16_pretrain")),
    "dino_vit_small_8": EncoderSpec(**{**_S16, "patch_size": 8, "pos_grid": 28}, **_V1,
                                    url=_DINO.format("dino_deitsmall8_pretrain")),
    "dino_vit_base_8": EncoderSpec(**{**_B16, "patch_size": 8, "pos_grid": 28}, **_V1,
                                   url=_DINO.format("dino_vitbase8_pretrain")),
    "ibot_vit_small_16": EncoderSpec(**_S16, **_V1, **_IBOT_LAYOUT, url=_IBOT.format("vits_16"),
                                     cache_name="ibot_vits_16_rand_mask_checkpoint_teacher.pth"),
    "ibot_vit_base_16": EncoderSpec(**_B16, **_V1, **_IBOT_LAYOUT, url=_IBOT.format("vitb_16"),
                                    cache_name="ibot_vitb_16_rand_mask_checkpoint_teacher.pth"),
    "mae_vit_base_16": EncoderSpec(**_B16, **_V1, **_MAE_LAYOUT,
                                   url="https://dl.fbaipublicfiles.com/mae/pretrain/mae_pretrain_vit_base.pth"),
    "mae_vit_large_16": EncoderSpec(**_L16, **_V1, **_MAE_LAYOUT,
                                    url="https://dl.fbaipublicfiles.com/mae/pretrain/mae_pretrain_vit_large.pth"),
    "mocov3_vit_small_16": EncoderSpec(**_S16, **_V1, **_MOCO_LAYOUT,
                                       url="https://dl.fbaipublicfiles.com/moco-v3/vit-s-300ep/vit-s-300ep.pth.tar"),
    "mocov3_vit_base_16": EncoderSpec(**_B16, **_V1, **_MOCO_LAYOUT,
                                      url="https://dl.fbaipublicfiles.com/moco-v3/vit-b-300ep/vit-b-300ep.pth.tar"),
    "deit_vit_small_16": EncoderSpec(**_S16, **_V1, checkpoint_key="model", dropped=(_HEAD,), sha256="cd65a155",
                                     url="https://dl.fbaipublicfiles.com/deit/deit_small_patch16_224-cd65a155.pth"),
    "deit_vit_base_16": EncoderSpec(**_B16, **_V1, checkpoint_key="model", dropped=(_HEAD,), sha256="b5f2ef4d",
                                    url="https://dl.fbaipublicfiles.com/deit/deit_base_patch16_224-b5f2ef4d.pth"),
    "beit_vit_base_16": EncoderSpec(**_B16, num_register_tokens=0, **_BEIT_LAYOUT, mean=(0.5, 0.5, 0.5),
                                    std=(0.5, 0.5, 0.5), url="https://github.com/addf400/files/releases/download/"
                                                             "v1.0/beit_base_patch16_224_pt22k_ft22k.pth"),
    "beitv2_vit_base_16": EncoderSpec(**_B16, num_register_tokens=0, **_BEIT_LAYOUT,
                                      url="https://github.com/addf400/files/releases/download/"
                                          "BEiT-v2/beitv2_base_patch16_224_pt1k_ft21k.pth"),
    "digpt_vit_base_16": EncoderSpec(**_B16, **_V1, **_MAE_LAYOUT, cache_name="D-iGPT_B_PT_1K.pth", how_to_get=(
        "D-iGPT has no stable public download: get D-iGPT_B_PT_1K.pth from the D-iGPT authors' release "
        "(github.com/OliverRensu/D-iGPT) and pass --encoder_weights PATH")),
})

# DINOv3 (facebookresearch/dinov3, dinov3/hub/backbones.py): patch 16, 4 storage tokens, RoPE. Downloads are
# gated: Meta e-mails each accepted requester personal URLs, so there is nothing to fetch here. The file goes
# under its official name (which carries its sha256 prefix) into the weights folder, or --encoder_weights PATH.
DINOV3_FORM = "https://ai.meta.com/resources/models-and-libraries/dinov3-downloads/"


def _dinov3(arch: str, dim: int, depth: int, heads: int, sha: str, data: str = "lvd1689m", **options) -> EncoderSpec:
    file_name = f"dinov3_{arch}_pretrain_{data}-{sha}.pth"
    mean, std = ((0.430, 0.411, 0.296), (0.213, 0.156, 0.143)) if data == "sat493m" else (IMAGENET_MEAN, IMAGENET_STD)
    dropped = options.pop("dropped", ())
    return EncoderSpec(dim, depth, heads, 4, family="dinov3", patch_size=16, sha256=sha, cache_name=file_name,
                       mean=mean, std=std, dropped=dropped, options=options, how_to_get=(
                           f"DINOv3 weights are gated: request access at {DINOV3_FORM}, download {file_name} from "
                           f"the link Meta e-mails you, and put it in {{folder}} (or pass --encoder_weights PATH)"))


_SWIGLU = dict(ffn="swiglu", ffn_ratio=6.0)
ENCODERS.update({
    "dinov3_vit_small_16": _dinov3("vits16", 384, 12, 6, "08c60483"),
    "dinov3_vit_small_plus_16": _dinov3("vits16plus", 384, 12, 6, "4057cbaa", **_SWIGLU),
    "dinov3_vit_base_16": _dinov3("vitb16", 768, 12, 12, "73cec8be"),
    "dinov3_vit_large_16": _dinov3("vitl16", 1024, 24, 16, "8aa4cbdd"),
    "dinov3_vit_huge_plus_16": _dinov3("vith16plus", 1280, 32, 20, "7c1da9a5", **_SWIGLU),
    # the 7B: no qkv bias, SwiGLU hidden width aligned to 64, and its untied local-crop class norm (unused)
    "dinov3_vit_7b_16": _dinov3("vit7b16", 4096, 40, 32, "a955f4ea", ffn="swiglu", ffn_ratio=3.0, swiglu_align=64,
                                qkv_bias=False, untie_local_cls_norm=True),
    # ViT-L on satellite images (SAT-493M): its own normalisation; its file's local-crop class norm of
    # pre-training is never applied at inference and is dropped on purpose.
    "dinov3sat_vit_large_16": _dinov3("vitl16", 1024, 24, 16, "eadcf0ff", data="sat493m",
                                      dropped=(r"^local_cls_norm\.",)),
})

# TIPS (google-deepmind/tips, README.md and pytorch/checkpoints/download_checkpoints.sh): Google's PyTorch
# vision files, flat .npz archives of the VisionTransformer's state dict (block_chunks=0). The preview code
# names the v1 S/B/L files tips_vit_{small,base,large}_14. Google publishes no digests. The high-resolution
# files are built for 448 px (a 32 x 32 position grid, as Google's inference code loads them strictly at
# 448), the g/14 low-res one for 224 px.
_TIPS = "https://storage.googleapis.com/tips_data/{0}/checkpoints/pytorch/{1}_vision.npz"
_TIPS_SIZES = {"small": dict(embed_dim=384, depth=12, num_heads=6), "base": dict(embed_dim=768, depth=12, num_heads=12),
               "large": dict(embed_dim=1024, depth=24, num_heads=16),
               "so400m": dict(embed_dim=1152, depth=27, num_heads=16, options={"mlp_hidden_dim": 4304}),
               "giant": dict(embed_dim=1536, depth=40, num_heads=24, ffn="swiglu")}


def _tips(size: str, version: str, file_stem: str, pos_grid: int = 32) -> EncoderSpec:
    return EncoderSpec(**_TIPS_SIZES[size], num_register_tokens=1, family="tips", pos_grid=pos_grid,
                       mean=TIPS_MEAN, std=TIPS_STD, url=_TIPS.format(version, file_stem))


ENCODERS.update({
    "tips_vit_small_14": _tips("small", "v1_0", "tips_oss_s14_highres_distilled"),
    "tips_vit_base_14": _tips("base", "v1_0", "tips_oss_b14_highres_distilled"),
    "tips_vit_large_14": _tips("large", "v1_0", "tips_oss_l14_highres_distilled"),
    "tips_vit_so400m_14": _tips("so400m", "v1_0", "tips_oss_so400m14_highres_largetext_distilled"),
    "tips_vit_giant_14": _tips("giant", "v1_0", "tips_oss_g14_highres"),
    "tips_vit_giant_lowres_14": _tips("giant", "v1_0", "tips_oss_g14_lowres", pos_grid=16),
    "tipsv2_vit_base_14": _tips("base", "v2_0", "tips_v2_oss_b14"),
    "tipsv2_vit_large_14": _tips("large", "v2_0", "tips_v2_oss_l14"),
    "tipsv2_vit_so400m_14": _tips("so400m", "v2_0", "tips_v2_oss_so14"),
    "tipsv2_vit_giant_14": _tips("giant", "v2_0", "tips_v2_oss_g14"),
})

# Tiny architectures with no official weights: for the test-suite and the offline CPU demo only.
ENCODERS["dinov2_vit_tiny_14"] = EncoderSpec(embed_dim=64, depth=10, num_heads=2, num_register_tokens=0)
ENCODERS["dinov2reg_vit_tiny_14"] = EncoderSpec(embed_dim=64, depth=10, num_heads=2, num_register_tokens=4)
ENCODERS["dinov2_vit_tiny_16"] = EncoderSpec(embed_dim=64, depth=10, num_heads=2, num_register_tokens=0,
                                             patch_size=16, pos_grid=32)
ENCODERS["dinov3_vit_tiny_16"] = EncoderSpec(embed_dim=64, depth=10, num_heads=2, num_register_tokens=4,
                                             family="dinov3", patch_size=16)


def default_target_layers(depth: int) -> list[int]:
    """The 8 encoder blocks reconstructed by default (`target_layers: auto`), from the encoder's depth.

    12 blocks: [2..9], the recipe. Deeper encoders keep the same relative depths, block round(depth * k / 12)
    for k = 2..9: 24 -> [4, 6, ..., 18] (the paper's ViT-L and the public DINOv3 port), 32 -> [5, 8, 11, 13,
    16, 19, 21, 24], 40 -> [7, 10, 13, 17, 20, 23, 27, 30]. Encoders of 10 or 11 blocks (the tests' tiny
    ones) take [2..9] as well; shallower ones have no default."""
    if depth < 10:
        raise ValueError(f"an encoder of {depth} blocks has no default target_layers; give them as a list")
    if depth <= 12:
        return list(range(2, 10))
    return [math.floor(depth * k / 12 + 0.5) for k in range(2, 10)]


def get_spec(name: str) -> EncoderSpec:
    if name not in ENCODERS:
        raise ValueError(f"unknown encoder '{name}'; choose one of: {', '.join(ENCODERS)}")
    return ENCODERS[name]
