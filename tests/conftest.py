"""Shared fixtures: checkpoints hand-built in Meta's layout and a synthetic MVTec-layout dataset."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from prepare_data.make_synthetic import make_dataset  # noqa: E402
from utils.run_setup import run_cli  # noqa: E402


def meta_state_dict(dim: int, depth: int, registers: int, generator: torch.Generator,
                    layer_scale: float = 1.0, patch: int = 14, grid: int = 37) -> dict[str, torch.Tensor]:
    """A DINOv2 checkpoint written key by key from RECIPE.md section 1, independent of our model code."""
    rand = lambda *shape, std=0.02: torch.randn(*shape, generator=generator) * std
    sd = {"cls_token": rand(1, 1, dim), "pos_embed": rand(1, grid * grid + 1, dim), "mask_token": rand(1, dim),
          "patch_embed.proj.weight": rand(dim, 3, patch, patch, std=0.05), "patch_embed.proj.bias": rand(dim)}
    if registers:
        sd["register_tokens"] = rand(1, registers, dim)
    for i in range(depth):
        b = f"blocks.{i}."
        sd.update({b + "norm1.weight": 1 + rand(dim), b + "norm1.bias": rand(dim),
                   b + "attn.qkv.weight": rand(3 * dim, dim, std=dim ** -0.5), b + "attn.qkv.bias": rand(3 * dim),
                   b + "attn.proj.weight": rand(dim, dim, std=dim ** -0.5), b + "attn.proj.bias": rand(dim),
                   b + "ls1.gamma": torch.full((dim,), layer_scale), b + "norm2.weight": 1 + rand(dim),
                   b + "norm2.bias": rand(dim), b + "mlp.fc1.weight": rand(4 * dim, dim, std=dim ** -0.5),
                   b + "mlp.fc1.bias": rand(4 * dim), b + "mlp.fc2.weight": rand(dim, 4 * dim, std=(4 * dim) ** -0.5),
                   b + "mlp.fc2.bias": rand(dim), b + "ls2.gamma": torch.full((dim,), layer_scale)})
    sd.update({"norm.weight": torch.ones(dim), "norm.bias": torch.zeros(dim)})
    return sd


def block_outputs(tokens: torch.Tensor, blocks, *extra) -> list[torch.Tensor]:
    """The output of every block of `blocks` applied in turn to `tokens` (an independent re-run of a
    Dinomaly half, for tests that rebuild its targets by hand); `extra` goes to every block."""
    outputs = []
    for block in blocks:
        tokens = block(tokens, *extra)
        outputs.append(tokens)
    return outputs


def encoder_layers(encoder, images: torch.Tensor, depth: int) -> list[torch.Tensor]:
    """The outputs of the encoder's first `depth` blocks, through the encoder interface."""
    tokens, pos = encoder.prepare_tokens(images)
    return block_outputs(tokens, encoder.blocks[:depth], pos)


@pytest.fixture(scope="session")
def tiny_weights(tmp_path_factory) -> Path:
    """Weights for `dinov2_vit_tiny_14` (64 wide, 10 blocks, no registers) in Meta's layout."""
    path = tmp_path_factory.mktemp("weights") / "tiny.pth"
    torch.save(meta_state_dict(64, 10, 0, torch.Generator().manual_seed(0), layer_scale=0.3), path)
    return path


@pytest.fixture(scope="session")
def synthetic_data(tmp_path_factory) -> Path:
    """Two texture classes with scratches, blobs and holes, 128 px."""
    root = tmp_path_factory.mktemp("synthetic")
    make_dataset(str(root), num_classes=2, num_train=32, num_test_good=8, num_test_defect=4, size=128, seed=0)
    return root


def tiny_run_args(data: Path, weights: Path, out: Path, **overrides) -> list[str]:
    """Command-line overrides for a CPU run of a few seconds on the synthetic data."""
    args = {"dataset": "folder", "data_path": data, "encoder": "dinov2_vit_tiny_14", "encoder_weights": weights,
            "image_size": 128, "crop_size": 112, "batch_size": 8, "total_iters": 200, "warmup_iters": 10,
            "hm_ramp_iters": 50, "device": "cpu", "num_workers": 0, "output_dir": out, "eval_every": 0,
            "run_name": "run"}
    args.update(overrides)
    return [item for key, value in args.items() for item in (f"--{key}", str(value))]


def run_script(script: str, args: list, check: bool = True) -> subprocess.CompletedProcess:
    """Run one of the repository's scripts as a user would."""
    result = subprocess.run([sys.executable, str(ROOT / script)] + [str(a) for a in args],
                            capture_output=True, text=True, cwd=ROOT)
    if check:
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def run_in_process(script, argv: list, capsys) -> subprocess.CompletedProcess:
    """A script's main through the same run_cli as its __main__ (any other exception, a traceback,
    fails the test), without starting a Python per case."""
    try:
        code = run_cli(script.main, [str(a) for a in argv], getattr(script, "SCRIPT_ERRORS", ()))
    except SystemExit as exit_:
        code = exit_.code
    out, err = capsys.readouterr()
    return subprocess.CompletedProcess(argv, code, out, err)


@pytest.fixture(scope="session")
def trained_run(synthetic_data, tiny_weights, tmp_path_factory) -> Path:
    """A unified run of 200 steps on the synthetic data (evaluated at steps 100 and 200)."""
    out = tmp_path_factory.mktemp("runs")
    run_script("train_uni.py", tiny_run_args(synthetic_data, tiny_weights, out, eval_every=100))
    return out / "run"
