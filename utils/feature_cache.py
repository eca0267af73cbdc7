"""--cache_features: the frozen encoder is deterministic and sees no augmentation, so its outputs
for a training image never change. They are computed once, in the compute dtype, and training then
runs only the bottleneck and decoder: the same step without the encoder's forward pass."""
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from datasets import TrainSet
from models import Dinomaly
from .run import autocast

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
            parts = [fused] + groups
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
