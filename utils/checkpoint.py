"""Checkpoints, resume and rollback: written atomically, read with weights_only=True, checked against
the architecture. A resumable checkpoint holds everything a step depends on; the finished one keeps
only what evaluation and prediction need."""
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from models import Dinomaly, build_model, load_state_dict_strict
from models.registry import load_weights_file
from .config import validate
from .distributed import all_gather_objects, barrier, is_main, rank
from .evaluation import EvaluationResult
from .rng import capture_rng, restore_rng

FORMAT = "dinomaly-checkpoint-v1"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used: unreadable, of another format or of another architecture."""


class CheckpointWriteError(CheckpointError, OSError):
    """A checkpoint that could not be written (disk full, no permission); the previous one is intact."""


class TrainingDiverged(RuntimeError):
    pass


def save_checkpoint(path: Path, payload: dict[str, Any]) -> None:
    """Write to a temporary file, fsync, then rename over `path`: a crash mid-write never leaves a
    truncated file under the real name."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            torch.save({"format": FORMAT, **payload}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as error:
        tmp.unlink(missing_ok=True)
        kept = f"; the previous {path} is intact" if path.is_file() else ""
        raise CheckpointWriteError(f"could not write the checkpoint {path} ({error}){kept}") from None


def load_checkpoint(path: Path, note: Callable[[str], None] = print) -> dict[str, Any]:
    """A checkpoint of this repository with its config completed (keys added since get their default)."""
    path = Path(path)
    if path.is_dir():
        path = path / "checkpoint.pth"
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    checkpoint = load_weights_file(path, "checkpoint", CheckpointError)
    if not isinstance(checkpoint, dict) or checkpoint.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a Dinomaly checkpoint of this repository (format {FORMAT})")
    checkpoint["config"] = validate(checkpoint["config"], f"config saved in {path}", note)
    checkpoint["path"] = str(path)
    return checkpoint


def load_trainable(model: Dinomaly, state_dict: dict[str, torch.Tensor], source: str) -> None:
    """Strictly load the trained weights (bottleneck, decoder, projection) saved by
    `Dinomaly.trainable_state_dict`."""
    parts = model.TRAINABLE_PARTS
    stray = [k for k in state_dict if not k.startswith(tuple(f"{p}." for p in parts))]
    if stray:
        raise CheckpointError(f"{source} has unexpected keys: {', '.join(stray[:8])}")
    for part in parts:
        prefix = f"{part}."
        sub = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
        try:
            load_state_dict_strict(getattr(model, part), sub, f"{source} ({part})")
        except RuntimeError as error:
            raise CheckpointError(str(error)) from None


def model_from_checkpoint(checkpoint: dict[str, Any], config: dict[str, Any] = None) -> Dinomaly:
    """Rebuild the model from the checkpoint's config (or `config`) and load its trained weights."""
    model = build_model(config or checkpoint["config"])
    load_trainable(model, checkpoint["model"], f"checkpoint {checkpoint['path']}")
    return model


@dataclass
class TrainState:
    """Progress that a checkpoint must carry besides weights, optimizer and random states. The data
    order and the learning rate follow from `step` and `reshuffles`."""
    step: int = 0
    reshuffles: int = 0                    # rollbacks so far; each draws a new data order from there on
    results: Optional[EvaluationResult] = None
    losses: list[float] = field(default_factory=list)


def save_training(path: Path, model: Dinomaly, optimizer: torch.optim.Optimizer, state: TrainState, cfg: dict,
                  classes: list[str], finished: bool = False) -> None:
    """Rank 0 writes a resumable checkpoint (or, `finished`, the slim final one) holding every process's
    random states; the others wait."""
    rng = all_gather_objects(capture_rng()) if not finished else None
    if is_main():
        payload = {"config": cfg, "model": model.trainable_state_dict(), "step": state.step, "classes": classes,
                   "results": state.results.rows if state.results else None,
                   "defects": state.results.defects if state.results else None,
                   "reshuffles": state.reshuffles, "finished": finished}
        if not finished:
            payload.update(optimizer=optimizer.state_dict(), rng=rng, losses=state.losses)
        save_checkpoint(path, payload)
    barrier()


def restore_training(checkpoint: dict, model: Dinomaly, optimizer: torch.optim.Optimizer,
                     note: Callable[[str], None] = print) -> TrainState:
    load_trainable(model, checkpoint["model"], f"checkpoint {checkpoint['path']}")
    optimizer.load_state_dict(checkpoint["optimizer"])
    restore_rng(checkpoint["rng"], rank(), checkpoint["config"]["seed"], note)
    return TrainState(checkpoint["step"], checkpoint["reshuffles"], saved_results(checkpoint),
                      list(checkpoint["losses"]))


def saved_results(checkpoint: dict) -> Optional[EvaluationResult]:
    """The last evaluation stored in a checkpoint (None if it has none yet)."""
    if not checkpoint["results"]:
        return None
    return EvaluationResult(checkpoint["results"], checkpoint["defects"], images=0, seconds=0.0)


def rollback(path: Path, model: Dinomaly, optimizer: torch.optim.Optimizer, state: TrainState,
             log: Callable[[str], None]) -> TrainState:
    """Back to the last checkpoint, with a fresh data order from there (the same one would fail again)."""
    barrier()
    if not path.is_file():
        raise TrainingDiverged(f"training went wrong at step {state.step} before the first checkpoint in {path}; "
                               f"try a lower lr, attn_eps > 0, or another seed")
    restored = restore_training(load_checkpoint(path), model, optimizer, log)
    restored.reshuffles = max(restored.reshuffles, state.reshuffles) + 1
    log(f"rolled back to step {restored.step} ({path}); data order reshuffled ({restored.reshuffles})")
    return restored


def previous_checkpoint(path: Path) -> Optional[dict]:
    """The checkpoint a resumed run continues from (None: start this model from scratch)."""
    return load_checkpoint(path) if path.is_file() else None


def finished_result(checkpoint: Optional[dict]) -> Optional[EvaluationResult]:
    """The results of a model whose training already finished, else None."""
    return saved_results(checkpoint) if checkpoint is not None and checkpoint["finished"] else None
