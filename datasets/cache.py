"""Decode and resize every training image once (uint8, image_size x image_size) so that a training
step does no PNG/JPEG decoding. What follows the resize (ToTensor, CenterCrop, Normalize) still runs
per step on the cached pixels, so the tensors are bit-identical to the uncached path."""
import hashlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image
from torchvision import transforms as T
from tqdm import tqdm

from .mvtec import TrainSet, load_image


def cache_key(paths: list[Path], size: int) -> str:
    digest = hashlib.sha1(f"{size}\n".encode())
    for path in paths:
        digest.update(f"{path}\n".encode())
    return digest.hexdigest()[:16]


def _decode_all(paths: list[Path], size: int, out: np.ndarray) -> None:
    resize = T.Resize((size, size))

    def decode(i: int) -> None:
        out[i] = np.asarray(resize(load_image(paths[i])))
    with ThreadPoolExecutor() as pool:  # PIL releases the GIL while decoding
        list(tqdm(pool.map(decode, range(len(paths))), total=len(paths), desc="caching images", unit="image"))


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
