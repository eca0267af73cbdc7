"""Training curves without a server or an account: CSVs and PNG plots in the run directory.

    train_steps.csv      one row per step: loss, lr, grad norm, hard-mining easy share, s/step, images/s
    eval_metrics.csv     one row per class (and the mean) per evaluation, metrics in percent (empty: not
                         computed, the pixel metrics of a run with masks: none)
    curves.png           loss and lr against step          (refreshed at each log line and evaluation)
    metrics.png          mean metrics against step         (refreshed at each evaluation)
    per_class.png        the final metrics of every class  (at the end)

With `logger` set, the same rows (and heatmap panels at each evaluation) also go to TensorBoard, W&B
or MLflow (utils/trackers.py).
"""
import csv
from pathlib import Path
from typing import Optional

import matplotlib

matplotlib.use("Agg")  # headless: no display needed, safe in data-loader workers and under torchrun
import matplotlib.pyplot as plt  # noqa: E402

from .evaluation import TABLE_COLUMNS, mean_row, percent  # noqa: E402
from .trackers import Trackers, panel_indices  # noqa: E402
from .visualize import sample_panel  # noqa: E402

STEP_FORMATS = {"loss": ".6g", "lr": ".6g", "grad_norm": ".6g", "hm_easy_share": ".4g", "s_per_step": ".4g",
                "images_per_s": ".4g"}
STEP_COLUMNS = ("step",) + tuple(STEP_FORMATS)
EVAL_COLUMNS = ("step", "class") + TABLE_COLUMNS


def read_rows(path: Path) -> list[dict[str, str]]:
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def last_step(path: Path) -> int:
    return max((int(row["step"]) for row in read_rows(path)), default=0)


class Curves:
    """Appends rows as training goes; on resume or rollback, rows past the restored step are dropped
    so that every step appears once. With `cfg` naming trackers (`logger`), they receive the same rows;
    used as a context manager, an exception (a signal, an error) closes them so that what they hold
    reaches the disk."""

    def __init__(self, run_dir: Path, start_step: int, enabled: bool = True, cfg: Optional[dict] = None):
        self.run_dir = Path(run_dir)
        self.steps_csv = self.run_dir / "train_steps.csv"
        self.eval_csv = self.run_dir / "eval_metrics.csv"
        self.enabled = enabled
        self.cfg, self.trackers, self.panels = cfg, None, {}
        sent = {"train": last_step(self.steps_csv), "eval": last_step(self.eval_csv)}  # before the restart cuts them
        self.restart_at(start_step)
        if enabled and cfg and cfg["logger"]:
            self.trackers = Trackers(cfg, self.run_dir, start_step, sent)

    def __enter__(self) -> "Curves":
        return self

    def __exit__(self, error_type, *_) -> None:
        if error_type is not None:
            self.close()

    def close(self) -> None:
        if self.trackers:
            self.trackers.close()

    def restart_at(self, step: int) -> None:
        if not self.enabled:
            return
        if self.trackers:
            self.trackers.restart_at(step)
        for path, columns in ((self.steps_csv, STEP_COLUMNS), (self.eval_csv, EVAL_COLUMNS)):
            kept = [row for row in read_rows(path) if int(row["step"]) <= step]
            with open(path, "w", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=columns)
                writer.writeheader()
                writer.writerows(kept)

    def _append(self, path: Path, columns: tuple[str, ...], rows: list[dict]) -> None:
        if self.enabled:
            with open(path, "a", newline="") as f:
                csv.DictWriter(f, fieldnames=columns).writerows(rows)

    def log_step(self, step: int, loss: float, lr: float, grad_norm: float, easy_share: float, seconds: float,
                 batch_size: int) -> None:
        values = {"loss": loss, "lr": lr, "grad_norm": grad_norm, "hm_easy_share": easy_share, "s_per_step": seconds,
                  "images_per_s": batch_size / seconds if seconds > 0 else float("nan")}
        self._append(self.steps_csv, STEP_COLUMNS,
                     [{"step": step, **{k: f"{v:{STEP_FORMATS[k]}}" for k, v in values.items()}}])
        if self.trackers:
            self.trackers.log("train", step, {f"train/{k}": v for k, v in values.items()})

    def collect_panels(self, name: str, dataset, outputs) -> None:
        """evaluate's on_class: with trackers, the heatmap panels of panel_indices for class `name`, on the
        class's own colour scale, to be sent with the evaluation's metrics."""
        if not self.trackers:
            return
        vmin, vmax = float(outputs.maps.min()), float(outputs.maps.max())
        for kind, index in panel_indices(outputs.scores.cpu().numpy(), outputs.labels.cpu().numpy()).items():
            self.panels[f"heatmaps/{name}/{kind}"] = sample_panel(dataset, outputs, index, self.cfg, vmin, vmax)

    def log_eval(self, step: int, rows: dict[str, dict[str, float]]) -> None:
        table = list(rows.items()) + [("mean", mean_row(rows))]
        self._append(self.eval_csv, EVAL_COLUMNS, [
            {"step": step, "class": name, **{k: percent(row[k], 4) for k in TABLE_COLUMNS}} for name, row in table])
        if self.trackers:  # empty cells (None: no masks, a modality without anomalous pixels) are not sent
            self.trackers.log("eval", step, {f"eval/{name}/{k}": 100 * row[k] for name, row in table
                                             for k in TABLE_COLUMNS if row[k] is not None}, self.panels)
            self.panels = {}
        self.plot()

    def plot(self) -> None:
        if self.enabled:
            plot_training(read_rows(self.steps_csv), self.run_dir / "curves.png")
            plot_metrics(read_rows(self.eval_csv), self.run_dir / "metrics.png")

    def plot_final(self, rows: Optional[dict[str, dict[str, float]]]) -> None:
        """per_class.png; curves.png and metrics.png were redrawn by the final evaluation's log_eval."""
        if self.enabled and rows:
            plot_per_class(rows, self.run_dir / "per_class.png")


def _save(fig, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_training(rows: list[dict[str, str]], path: Path) -> None:
    if not rows:
        return
    steps = [int(r["step"]) for r in rows]
    fig, (ax_loss, ax_lr) = plt.subplots(2, 1, figsize=(8, 6), sharex=True)
    ax_loss.plot(steps, [float(r["loss"]) for r in rows], lw=0.8)
    ax_loss.set_ylabel("loss")
    ax_loss.set_yscale("log")
    ax_lr.plot(steps, [float(r["lr"]) for r in rows], color="tab:orange")
    ax_lr.set_ylabel("learning rate")
    ax_lr.set_xlabel("step")
    _save(fig, path)


def plot_metrics(rows: list[dict[str, str]], path: Path) -> None:
    mean = [r for r in rows if r["class"] == "mean"]
    if not mean:
        return
    fig, ax = plt.subplots(figsize=(8, 5))
    steps = [int(r["step"]) for r in mean]
    for column in [c for c in TABLE_COLUMNS if all(r[c] for r in mean)]:  # not the empty pixel columns
        ax.plot(steps, [float(r[column]) for r in mean], marker="o", label=column)
    ax.set_xlabel("step")
    ax.set_ylabel("mean over classes (%)")
    ax.legend(fontsize=8, ncol=2)
    _save(fig, path)


def plot_per_class(rows: dict[str, dict[str, float]], path: Path, columns=("I-AUROC", "P-AUROC", "P-AP", "AUPRO")
                   ) -> None:
    names = list(rows) + ["mean"]
    table = {**rows, "mean": mean_row(rows)}
    columns = [c for c in columns if table["mean"][c] is not None]  # masks: none has no pixel metrics
    fig, ax = plt.subplots(figsize=(max(6.0, 0.6 * len(names) * len(columns) / 2), 5))
    width = 0.8 / len(columns)
    for j, column in enumerate(columns):
        ax.bar([i + j * width for i in range(len(names))], [100 * table[n][column] for n in names], width, label=column)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(names))], names, rotation=45, ha="right")
    ax.set_ylabel("%")
    ax.set_ylim(0, 115)
    ax.legend(fontsize=8, loc="upper center", ncol=len(columns))
    _save(fig, path)
