"""Experiment trackers beside the CSVs (config key `logger`: any of tensorboard, wandb, mlflow).

Each tracker receives the columns of train_steps.csv (as train/<column>) and of eval_metrics.csv (as
eval/<class or mean>/<metric>, in percent), the resolved config as hyper-parameters when its run is
created, and at each evaluation three heatmap panels per class: the highest-scored normal test image
(the worst false alarm) and the highest- and lowest-scored anomalous ones. Rank 0 alone logs. Files stay
in the run directory (the class folder under train_sep.py):

    tensorboard/             event files: tensorboard --logdir runs
    wandb/                   a W&B run, offline unless WANDB_MODE says otherwise: wandb sync <run_dir>/wandb/offline-run-*
    mlflow.db, mlartifacts/  MLflow's local store, unless mlflow_uri (or MLFLOW_TRACKING_URI) names a server
    trackers.json            the W&B and MLflow run ids, so that --resume continues the same runs

A resume or rollback to step S must not show steps twice: TensorBoard drops its events after S
(purge_step) and receives them again; W&B and MLflow cannot delete points, so the steps they already
hold are not sent again (after a resume they are the same values: resuming is bit-identical).
"""
import importlib.util
import json
import os
import re
import time
from pathlib import Path
from typing import Optional

import numpy as np

from .config import ConfigError

# tracker -> the modules it imports and the pip command that installs them
PACKAGES = {
    "tensorboard": (("tensorboard",), "pip install tensorboard"),
    "wandb": (("wandb",), "pip install wandb"),
    "mlflow": (("mlflow", "sqlalchemy", "alembic"), "pip install mlflow-skinny sqlalchemy alembic"),
}
STATE_FILE = "trackers.json"


def check_installed(names: Optional[list[str]]) -> None:
    """A tracker whose package is missing is a one-line error naming the pip command (called before
    any run directory exists)."""
    for name in names or []:
        modules, command = PACKAGES[name]
        missing = [m for m in modules if importlib.util.find_spec(m) is None]
        if missing:
            raise ConfigError(f"logger {name} needs {', '.join(missing)}: {command} "
                              f"(or pip install -r requirements-trackers.txt)")


def hyper_parameters(cfg: dict) -> dict:
    """The config as TensorBoard and MLflow take it: numbers, bools and strings; lists and null as JSON."""
    return {k: v if isinstance(v, (bool, int, float, str)) else json.dumps(v) for k, v in cfg.items()}


def panel_indices(scores: np.ndarray, labels: np.ndarray) -> dict[str, int]:
    """The test images a person looks at first: the highest-scored normal one and the highest- and
    lowest-scored anomalous ones (a class without normal or anomalous images has fewer)."""
    picks = {}
    for kind, label, pick in (("worst_normal", 0, np.argmax), ("best_anomalous", 1, np.argmax),
                              ("worst_anomalous", 1, np.argmin)):
        candidates = np.flatnonzero(labels == label)
        if len(candidates):
            picks[kind] = int(candidates[pick(scores[candidates])])
    return picks


class TensorBoard:
    """Event files in <run_dir>/tensorboard; restarting at step S writes a purge marker, so TensorBoard's
    reader drops every event after S of the earlier files."""
    rewrites = True

    def __init__(self, run_dir: Path, name: str, run_id: Optional[str], step: int, cfg: dict):
        from torch.utils.tensorboard import SummaryWriter
        from torch.utils.tensorboard.summary import hparams
        self.writer_class, self.dir, self.run_id = SummaryWriter, str(run_dir / "tensorboard"), "tensorboard"
        self.writer = SummaryWriter(self.dir, purge_step=step + 1 if run_id else None)
        if run_id is None:
            for summary in hparams(hyper_parameters(cfg), {}):
                self.writer.file_writer.add_summary(summary)

    def log(self, step: int, values: dict[str, float]) -> None:
        for key, value in values.items():
            self.writer.add_scalar(key, value, step)

    def log_images(self, step: int, images: dict[str, np.ndarray]) -> None:
        for key, image in images.items():
            self.writer.add_image(key, image, step, dataformats="HWC")

    def restart_at(self, step: int) -> None:
        self.writer.close()
        self.writer = self.writer_class(self.dir, purge_step=step + 1)

    def close(self) -> None:
        self.writer.close()


class WandB:
    """A W&B run in <run_dir>/wandb, offline by default (no account needed; `wandb sync` uploads it),
    online with WANDB_MODE=online; project WANDB_PROJECT, else dinomaly."""
    rewrites = False

    def __init__(self, run_dir: Path, name: str, run_id: Optional[str], step: int, cfg: dict):
        import wandb
        self.image = wandb.Image
        self.run = wandb.init(dir=str(run_dir), project=os.environ.get("WANDB_PROJECT", "dinomaly"), name=name,
                              id=run_id, resume="allow" if run_id else None, config=None if run_id else cfg,
                              mode=os.environ.get("WANDB_MODE", "offline"), settings=wandb.Settings(console="off"))
        self.run_id = self.run.id

    def log(self, step: int, values: dict[str, float]) -> None:
        self.run.log(values, step=step)

    def log_images(self, step: int, images: dict[str, np.ndarray]) -> None:
        self.run.log({key: self.image(image) for key, image in images.items()}, step=step)

    def restart_at(self, step: int) -> None:
        pass

    def close(self) -> None:
        self.run.finish()


class MLflow:
    """An MLflow run in experiment MLFLOW_EXPERIMENT_NAME (else dinomaly) of the store `mlflow_uri`,
    else MLFLOW_TRACKING_URI, else <run_dir>/mlflow.db with artifacts in <run_dir>/mlartifacts. Metrics
    are sent in the background (a local database commit per step would slow training)."""
    rewrites = False
    KEY = re.compile(r"[^\w.\- /:]")  # characters MLflow refuses in a key (a class folder may hold them)

    def __init__(self, run_dir: Path, name: str, run_id: Optional[str], step: int, cfg: dict):
        from mlflow import MlflowClient
        from mlflow.entities import Metric, Param
        self.metric = Metric
        uri = cfg["mlflow_uri"] or os.environ.get("MLFLOW_TRACKING_URI")
        self.client = MlflowClient(uri or f"sqlite:///{(run_dir / 'mlflow.db').resolve()}")
        self.pending = []
        if run_id is None:
            experiment = os.environ.get("MLFLOW_EXPERIMENT_NAME", "dinomaly")
            found = self.client.get_experiment_by_name(experiment)
            artifacts = None if uri else (run_dir / "mlartifacts").resolve().as_uri()
            experiment_id = found.experiment_id if found else self.client.create_experiment(experiment, artifacts)
            run_id = self.client.create_run(experiment_id, run_name=name).info.run_id
            self.client.log_batch(run_id, params=[Param(k, str(v)) for k, v in hyper_parameters(cfg).items()])
        else:
            self.client.update_run(run_id, status="RUNNING")
        self.run_id = run_id

    def log(self, step: int, values: dict[str, float]) -> None:
        now = int(time.time() * 1000)
        metrics = [self.metric(self.KEY.sub("_", k), v, now, step) for k, v in values.items()]
        self.pending.append(self.client.log_batch(self.run_id, metrics=metrics, synchronous=False))

    def log_images(self, step: int, images: dict[str, np.ndarray]) -> None:
        for key, image in images.items():
            self.client.log_image(self.run_id, image, key=self.KEY.sub("_", key), step=step)

    def restart_at(self, step: int) -> None:
        pass

    def close(self) -> None:
        for operation in self.pending:
            operation.wait()
        self.pending.clear()
        self.client.set_terminated(self.run_id)


BACKENDS = {"tensorboard": TensorBoard, "wandb": WandB, "mlflow": MLflow}


class Trackers:
    """The trackers of `cfg['logger']` for one run directory (created on rank 0 only).

    `sent` holds, per kind of row ("train", "eval"), the last step the trackers received before this
    process (the CSVs' last step before they were cut back at the restart); trackers that cannot delete
    points skip those steps."""

    def __init__(self, cfg: dict, run_dir: Path, step: int, sent: dict[str, int]):
        self.state_path = run_dir / STATE_FILE
        state = json.loads(self.state_path.read_text()) if self.state_path.is_file() else {}
        self.sent = {kind: max(last, state.get("sent", {}).get(kind, 0)) for kind, last in sent.items()}
        self.highest = dict(self.sent)
        name = run_dir.name if run_dir.name == cfg["run_name"] else f"{run_dir.parent.name}/{run_dir.name}"
        self.backends = {tracker: BACKENDS[tracker](run_dir, name, state.get(tracker), step, cfg)
                         for tracker in dict.fromkeys(cfg["logger"])}
        self._save_state()

    def _save_state(self) -> None:
        state = {tracker: backend.run_id for tracker, backend in self.backends.items()}
        self.state_path.write_text(json.dumps({**state, "sent": self.highest}, indent=1) + "\n")

    def log(self, kind: str, step: int, values: dict[str, float], images: Optional[dict[str, np.ndarray]] = None
            ) -> None:
        """Rows of `kind` ("train" or "eval") at `step`, and (eval) the heatmap panels."""
        self.highest[kind] = max(self.highest[kind], step)
        for backend in self.backends.values():
            if backend.rewrites or step > self.sent[kind]:
                backend.log(step, values)
                if images:
                    backend.log_images(step, images)

    def restart_at(self, step: int) -> None:
        """A rollback to `step`: what was sent after it stays sent (recorded in case the run is resumed)."""
        self.sent = dict(self.highest)
        self._save_state()
        for backend in self.backends.values():
            backend.restart_at(step)

    def close(self) -> None:
        for backend in self.backends.values():
            backend.close()
        self.backends = {}

