"""What is wrong with a weights file, said in one line: not a PyTorch file or NumPy .npz archive (empty,
text, a damaged or foreign archive), objects other than arrays, or keys and shapes of another architecture."""
import pickle
import zipfile
from pathlib import Path
from typing import Optional

import numpy as np
import torch


class WeightsError(RuntimeError):
    """Encoder weights that cannot be used: not downloadable, corrupt, unreadable or of another model."""


def check_state_dict(module: torch.nn.Module, state_dict: dict, source: str) -> None:
    """Every key and shape of `state_dict` against `module` (which may live on the meta device); the
    one-line error lists what differs and names the file."""
    not_tensors = [k for k, v in state_dict.items() if not isinstance(v, torch.Tensor)]
    if not_tensors:
        raise WeightsError(f"{source} is not a flat state dict of tensors: '{not_tensors[0]}' holds a "
                           f"{type(state_dict[not_tensors[0]]).__name__}")
    expected = module.state_dict()
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    mismatched = [f"{k}: file {tuple(state_dict[k].shape)} vs model {tuple(expected[k].shape)}"
                  for k in expected if k in state_dict and state_dict[k].shape != expected[k].shape]
    if missing or unexpected or mismatched:
        parts = [f"{title} ({len(items)}): " + ", ".join(items[:8]) + (" ..." if len(items) > 8 else "")
                 for title, items in (("missing keys", missing), ("unexpected keys", unexpected),
                                      ("shape mismatches", mismatched)) if items]
        raise WeightsError(f"{source} does not match the architecture: " + "; ".join(parts))


def load_state_dict_strict(module: torch.nn.Module, state_dict: dict, source: str) -> None:
    """Load with every key and shape checked (check_state_dict)."""
    check_state_dict(module, state_dict, source)
    module.load_state_dict(state_dict, strict=True)


ZIP_MAGIC = b"PK\x03\x04"  # PyTorch's format since 1.6 is a zip archive holding <name>/data.pkl


def _zip_names(path: Path) -> Optional[list[str]]:
    """The member names of a zip archive; None when it is damaged or truncated."""
    try:
        with zipfile.ZipFile(path) as archive:
            return archive.namelist()
    except (zipfile.BadZipFile, OSError):
        return None


def what_is_wrong_with(path: Path) -> Optional[str]:
    """Why `path` cannot be a PyTorch file, from its first bytes and zip directory (None: it may be one).
    Cheap: nothing is unpickled."""
    with open(path, "rb") as f:
        head = f.read(64)
    if not head:
        return "the file is empty"
    if head.startswith(ZIP_MAGIC):
        names = _zip_names(path)
        if names is None:
            return "a damaged or truncated zip archive (PyTorch files are zip archives; download it again)"
        if not any(name.endswith("data.pkl") for name in names):
            return (f"a zip archive of something else, not a PyTorch file (no data.pkl inside; it holds "
                    f"{', '.join(names[:3]) or 'nothing'})")
        return None
    if head[0] == 0x80:  # a pickle: PyTorch's format before 1.6
        return None
    if all(32 <= b < 127 or b in b"\t\r\n" for b in head):
        return f"a text file, not a PyTorch file (it starts with {head[:40].decode().strip()!r})"
    return f"not a PyTorch file: neither a zip archive nor a pickle (it starts with bytes {head[:8].hex(' ')})"


def load_weights_file(path: Path, what: str, error: type = WeightsError, mmap: bool = False):
    """torch.load of a file a user hands us: weights_only=True, and an unusable file is one `error` line
    naming it and saying what it is. `mmap` maps tensors instead of reading them (a cheap look at keys
    and shapes; only for zip-format files)."""
    problem = what_is_wrong_with(path)
    if problem is not None:
        raise error(f"could not read {what} {path}: {problem}")
    with open(path, "rb") as f:
        mmap = mmap and f.read(4) == ZIP_MAGIC
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError:
        raise error(f"could not read {what} {path}: it holds Python objects other than tensors and plain "
                    f"containers, which are never loaded from a file handed to us (weights_only)") from None
    except Exception as failure:
        lines = str(failure).strip().splitlines() or [type(failure).__name__]
        raise error(f"could not read {what} {path}: corrupt or truncated ({lines[0]})") from None


def what_is_wrong_with_npz(path: Path) -> Optional[str]:
    """Why `path` cannot be a NumPy .npz archive (a zip of .npy arrays), from its first bytes and zip
    directory (None: it may be one)."""
    with open(path, "rb") as f:
        head = f.read(64)
    if not head:
        return "the file is empty"
    if not head.startswith(ZIP_MAGIC):
        return f"not a NumPy .npz archive: not a zip archive (it starts with bytes {head[:8].hex(' ')})"
    names = _zip_names(path)
    if names is None:
        return "a damaged or truncated zip archive (.npz files are zip archives; download it again)"
    if not names or not all(name.endswith(".npy") for name in names):
        return (f"a zip archive of something else, not a NumPy .npz archive (it holds "
                f"{', '.join(names[:3]) or 'nothing'}, not only .npy arrays)")
    return None


def _npz_shapes(path: Path) -> dict:
    """Meta tensors of the stored shapes and dtypes, read from each array's .npy header only."""
    readers = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
    shapes = {}
    with zipfile.ZipFile(path) as archive:
        for name in archive.namelist():
            with archive.open(name) as f:
                shape, _, dtype = readers[np.lib.format.read_magic(f)](f)
            shapes[name[:-len(".npy")]] = torch.empty(shape, dtype=torch.from_numpy(np.empty(0, dtype)).dtype,
                                                      device="meta")
    return shapes


def load_npz_file(path: Path, what: str, shapes_only: bool = False, error: type = WeightsError) -> dict:
    """A NumPy .npz archive of named arrays (TIPS's official format) as a dict of tensors, read with
    allow_pickle=False; an unusable file is one `error` line naming it. `shapes_only`: meta tensors of the
    stored shapes (a cheap look at keys and shapes; nothing is read but the headers)."""
    problem = what_is_wrong_with_npz(path)
    if problem is not None:
        raise error(f"could not read {what} {path}: {problem}")
    try:
        if shapes_only:
            return _npz_shapes(path)
        with np.load(path, allow_pickle=False) as archive:
            return {key: torch.from_numpy(archive[key]) for key in archive.files}
    except Exception as failure:
        lines = str(failure).strip().splitlines() or [type(failure).__name__]
        raise error(f"could not read {what} {path}: corrupt, truncated or not arrays of numbers "
                    f"({lines[0]})") from None
