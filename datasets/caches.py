"""The two training caches, both off by default and neither changing what a step computes.

--image_cache: every training image is decoded and resized once (uint8, image_size x image_size), so a
step does no PNG/JPEG decoding. What follows the resize (ToTensor, CenterCrop, Normalize) still runs
per step on the cached pixels, so the tensors are bit-identical to the uncached path.

--cache_features: the frozen encoder is deterministic and sees no augmentation, so its outputs for a
training image never change. They are computed once, in the compute dtype, and training then runs only
the bottleneck and decoder: the same step without the encoder's forward pass."""
import hashlib
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms as T
from tqdm import tqdm

from models import Dinomaly
from utils.device import autocast, compute_dtype
from .folder import TrainSet, load_image, map_images


def cache_key(paths: list[Path], size: int) -> str:
    digest = hashlib.sha1(f"{size}\n".encode())
    for path in paths:
        digest.update(f"{path}\n".encode())
    return digest.hexdigest()[:16]


def _decode_all(paths: list[Path], size: int, out: np.ndarray) -> None:
    resize = T.Resize((size, size))

    def decode(i: int) -> None:
        out[i] = np.asarray(resize(load_image(paths[i])))
    map_images(decode, range(len(paths)), "caching images")


def attach_image_cache(train_set: TrainSet, mode: str, cache_dir: Path, size: int,
                       log: Callable[[str], None] = print) -> None:
    """Fill train_set.cache in memory, or in a file under cache_dir that later runs reuse."""
    paths = [path for path, _ in train_set.samples]
    shape = (len(paths), size, size, 3)
    log(f"image cache ({mode}): {len(paths)} images, {np.prod(shape) / 2 ** 30:.2f} GiB")
    if mode == "memory":
        cache = np.empty(shape, np.uint8)
        _decode_all(paths, size, cache)
    else:
        path = Path(cache_dir) / f"images_{cache_key(paths, size)}.npy"
        if not path.is_file():
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(path.name + ".tmp")
            cache = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=shape)
            _decode_all(paths, size, cache)
            cache.flush()
            del cache
            tmp.replace(path)
        cache = np.load(path, mmap_mode="r")
        log(f"image cache file: {path}")
    train_set.use_cache(cache)


_NUMPY = {torch.float32: np.float32, torch.bfloat16: np.int16, torch.float16: np.float16}


class FeatureCache(Dataset):
    """Items are ((bottleneck input, [encoder group maps]), index), as Dinomaly.forward accepts them."""

    def __init__(self, model: Dinomaly, train_set: TrainSet, cfg: dict, device: torch.device, mode: str,
                 cache_dir: Path, log: Callable[[str], None] = print):
        loader = DataLoader(train_set, batch_size=cfg["batch_size"], num_workers=cfg["num_workers"],
                            generator=torch.Generator())
        self.arrays = None
        for images, index in tqdm(loader, desc="caching encoder features", unit="batch"):
            with autocast(device, cfg["precision"]):
                fused, groups = model.encode(images.to(device))
            parts = [p.to(compute_dtype(cfg["precision"])) for p in [fused] + groups]
            if self.arrays is None:
                self.dtype = parts[0].dtype
                self.arrays = [self._allocate(len(train_set), p, mode, Path(cache_dir) / f"features_{i}.npy")
                               for i, p in enumerate(parts)]
                total = sum(a.nbytes for a in self.arrays) / 2 ** 30
                log(f"feature cache ({mode}): {len(train_set)} images, {total:.2f} GiB in {self.dtype}")
            for array, part in zip(self.arrays, parts):
                array[index.numpy()] = self._to_numpy(part.cpu())

    def _allocate(self, n: int, part: torch.Tensor, mode: str, path: Path) -> np.ndarray:
        shape, dtype = (n, *part.shape[1:]), _NUMPY[part.dtype]
        if mode == "memory":
            return np.empty(shape, dtype)
        path.parent.mkdir(parents=True, exist_ok=True)
        return np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=shape)

    def _to_numpy(self, t: torch.Tensor) -> np.ndarray:
        return (t.view(torch.int16) if t.dtype == torch.bfloat16 else t).numpy()

    def _to_torch(self, a: np.ndarray) -> torch.Tensor:
        t = torch.from_numpy(np.array(a))
        return t.view(torch.bfloat16) if self.dtype == torch.bfloat16 else t

    def __len__(self) -> int:
        return len(self.arrays[0])

    def __getitem__(self, index: int):
        fused, *groups = (self._to_torch(a[index]) for a in self.arrays)
        return (fused, groups), index
