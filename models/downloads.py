"""Official weights files: the cache folder, the download (atomic, with the one-line offline error), the
sha256 check."""
import hashlib
import os
import urllib.error
import urllib.request
from functools import lru_cache
from pathlib import Path
from typing import Optional

import torch

from .encoder_table import get_spec
from .weights_file import WeightsError


def default_weights_dir() -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints"


@lru_cache(maxsize=32)
def _cached_sha256(path: str, size: int, mtime_ns: int) -> str:
    """sha256_of, once per file version in a process: a run checks its weights before the run directory
    exists and loads them again to train (train_sep.py once per class)."""
    return sha256_of(Path(path))


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _download(url: str, dest: Path) -> None:
    """Write to a temporary file next to `dest`, fsync, then rename: a broken download leaves no file."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(dest.name + ".part")
    print(f"Downloading {url} -> {dest}", flush=True)
    try:
        with urllib.request.urlopen(url, timeout=60) as response, open(tmp, "wb") as f:
            while chunk := response.read(1 << 20):
                f.write(chunk)
            f.flush()
            os.fsync(f.fileno())
    except (urllib.error.URLError, OSError) as error:
        tmp.unlink(missing_ok=True)
        raise WeightsError(
            f"could not download the encoder weights from {url} ({error}). Offline? Download that file by hand "
            f"and put it at {dest} (the file name must be {dest.name}), or pass --encoder_weights PATH to a "
            f"local copy") from None
    os.replace(tmp, dest)


def resolve_weights(name: str, weights_dir: Optional[str] = None) -> Path:
    """Path of the official checkpoint in the cache, downloading and verifying it as needed."""
    spec = get_spec(name)
    folder = Path(weights_dir).expanduser() if weights_dir else default_weights_dir()
    path = folder / spec.file_name if spec.file_name else None
    if spec.url is None and not (path and path.exists()):
        raise WeightsError(spec.how_to_get.format(folder=folder) if spec.how_to_get else
                           f"encoder '{name}' has no official weights; pass --encoder_weights PATH or "
                           f"--encoder_weights random")
    if not path.exists():
        _download(spec.url, path)
    if spec.sha256 is not None:
        stat = path.stat()
        actual = _cached_sha256(str(path), stat.st_size, stat.st_mtime_ns)
        if not actual.startswith(spec.sha256):
            raise WeightsError(f"sha256 mismatch for {path}: expected {spec.sha256}, got {actual}. "
                               f"The file is corrupt or not {spec.file_name}; delete it to download again.")
    return path
