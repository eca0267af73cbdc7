"""Experiment trackers (config key `logger`): what TensorBoard, W&B and MLflow hold, read back with each
library's own reader, equals train_steps.csv and eval_metrics.csv, every step once across a resume;
they hold the config and, per evaluation and class, the heatmap panels of the extreme test images."""
import csv
import importlib.util
import json
import shutil
import struct
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import yaml

import train_uni
from conftest import run_in_process, tiny_run_args
from datasets import build_test_set
from models import input_normalization
from utils import trackers
from utils.checkpoint import load_checkpoint, model_from_checkpoint
from utils.curves import STEP_FORMATS
from utils.evaluation import TABLE_COLUMNS, infer_class
from utils.run_setup import run_cli
from utils.visualize import to_display_image

INSTALLED = [name for name, (modules, _) in trackers.PACKAGES.items()
             if all(importlib.util.find_spec(module) for module in modules)]
TRACKED = dict(image_size=64, crop_size=56, map_size=64, total_iters=4, warmup_iters=1, ckpt_every=1, eval_every=2)
KILLED_AT = 2  # the process dies writing step 2's checkpoint, after step 2 and its evaluation were logged
EVAL_STEPS = [2, 4]
PANEL_KINDS = ("worst_normal", "best_anomalous", "worst_anomalous")
TIMING = ("s_per_step", "images_per_s")  # measured again when a step is redone


class Killed(Exception):
    pass


@pytest.fixture(scope="module")
def tracked_run(synthetic_data, tiny_weights, tmp_path_factory) -> Path:
    """A run logging to every installed tracker, killed while saving step 2 (its last checkpoint is step
    1's), then resumed to the end (step 4); evaluations at steps 2 and 4, two classes."""
    if not INSTALLED:
        pytest.skip("no tracker installed (pip install -r requirements-trackers.txt)")
    out = tmp_path_factory.mktemp("tracked")
    args = [str(a) for a in tiny_run_args(synthetic_data, tiny_weights, out, logger=",".join(INSTALLED), **TRACKED)]
    save = train_uni.save_training

    def dies_at_step_2(path, model, optimizer, state, *rest, **kwargs):
        if state.step == KILLED_AT:
            raise Killed
        save(path, model, optimizer, state, *rest, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        for name in ("WANDB_MODE", "WANDB_PROJECT", "MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME"):
            patch.delenv(name, raising=False)
        patch.setattr(train_uni, "save_training", dies_at_step_2)
        with pytest.raises(Killed):
            run_cli(train_uni.main, args)
        assert torch.load(out / "run" / "checkpoint.pth", weights_only=True)["step"] == KILLED_AT - 1
        patch.setattr(train_uni, "save_training", save)
        assert run_cli(train_uni.main, ["--resume", str(out / "run")]) == 0
    return out / "run"


def csv_series(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """The CSVs under the trackers' names, train/<column> and eval/<class>/<metric>: (step, value) in order."""
    series = {}
    with open(run_dir / "train_steps.csv", newline="") as f:
        for row in csv.DictReader(f):
            for column in STEP_FORMATS:
                series.setdefault(f"train/{column}", []).append((int(row["step"]), float(row[column])))
    with open(run_dir / "eval_metrics.csv", newline="") as f:
        for row in csv.DictReader(f):
            for metric in TABLE_COLUMNS:
                series.setdefault(f"eval/{row['class']}/{metric}", []).append((int(row["step"]), float(row[metric])))
    return series


def assert_equals_csv(held: dict[str, list[tuple[int, float]]], run_dir: Path, timing_redone: bool) -> None:
    """Every series of the CSVs, each step once and in order, the values equal up to the CSV's rounding
    (6 or 4 significant digits, 4 decimals for metrics). With `timing_redone`, the tracker kept the first
    attempt's timing of the redone steps (the loss, lr and metrics are the same: resuming is bit-identical)."""
    expected = csv_series(run_dir)
    assert [step for step, _ in expected["train/loss"]] == [1, 2, 3, 4]
    assert [step for step, _ in expected["eval/mean/I-AUROC"]] == EVAL_STEPS
    assert held.keys() == expected.keys()
    for key, points in expected.items():
        assert [step for step, _ in held[key]] == [step for step, _ in points], key
        column = key.split("/")[-1]
        if timing_redone and column in TIMING:
            assert all(value > 0 for _, value in held[key]), key
            continue
        tolerance = dict(rel=0.5 * 10.0 ** (1 - int(STEP_FORMATS[column][1]))) if key.startswith("train/") else \
            dict(abs=0.5e-4 + 1e-5)  # TensorBoard holds float32: 1e-5 at 100 %
        assert [value for _, value in held[key]] == pytest.approx([value for _, value in points], **tolerance), key


def saved_config(run_dir: Path) -> dict:
    return yaml.safe_load((run_dir / "config.yaml").read_text())


def as_hyper_parameter(value):
    """A config value as TensorBoard and MLflow hold it: numbers, bools and strings as they are, the rest as JSON."""
    return value if isinstance(value, (bool, int, float, str)) else json.dumps(value)


def decode_png(data: bytes) -> np.ndarray:
    return cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)[..., ::-1]


# --- TensorBoard: its event reader --------------------------------------------------------------------

def tensorboard_events(run_dir: Path):
    event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    events = event_accumulator.EventAccumulator(str(run_dir / "tensorboard"),
                                                size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    events.Reload()
    return events


def tensorboard_panels(run_dir: Path) -> dict[tuple[str, int], np.ndarray]:
    events = tensorboard_events(run_dir)
    return {(tag, image.step): decode_png(image.encoded_image_string)
            for tag in events.Tags()["images"] for image in events.Images(tag)}


def test_tensorboard_holds_the_csvs_and_the_config(tracked_run):
    events = tensorboard_events(tracked_run)
    held = {tag: [(event.step, event.value) for event in events.Scalars(tag)] for tag in events.Tags()["scalars"]}
    assert_equals_csv(held, tracked_run, timing_redone=False)  # the redone steps were purged and written again

    from tensorboard.plugins.hparams.plugin_data_pb2 import HParamsPluginData
    start = HParamsPluginData.FromString(events.PluginTagToContent("hparams")["_hparams_/session_start_info"])
    hparams = {key: getattr(value, value.WhichOneof("kind"))
               for key, value in start.session_start_info.hparams.items()}
    assert hparams == {key: as_hyper_parameter(value) for key, value in saved_config(tracked_run).items()}


# --- MLflow: its client on the run directory's store ----------------------------------------------------

def mlflow_run(run_dir: Path):
    mlflow = pytest.importorskip("mlflow")
    client = mlflow.MlflowClient(f"sqlite:///{run_dir / 'mlflow.db'}")
    run_id = json.loads((run_dir / "trackers.json").read_text())["mlflow"]
    return client, client.get_run(run_id)


def mlflow_panels(run_dir: Path, tmp_path: Path) -> dict[tuple[str, int], np.ndarray]:
    """log_image's files are named <key with ~ for />+step+<step>+timestamp+..."""
    client, run = mlflow_run(run_dir)
    panels = {}
    for artifact in client.list_artifacts(run.info.run_id, "images"):
        if artifact.path.endswith(".png"):
            key, _, step = Path(artifact.path).stem.split("+")[:3]
            local = client.download_artifacts(run.info.run_id, artifact.path, str(tmp_path))
            panels[(key.replace("~", "/"), int(step))] = decode_png(Path(local).read_bytes())
    return panels


def test_mlflow_holds_the_csvs_and_the_config_in_one_run(tracked_run):
    client, run = mlflow_run(tracked_run)
    assert [r.info.run_id for r in client.search_runs([run.info.experiment_id])] == [run.info.run_id]
    assert run.info.status == "FINISHED"
    held = {key: [(m.step, m.value) for m in sorted(client.get_metric_history(run.info.run_id, key),
                                                     key=lambda m: m.step)] for key in run.data.metrics}
    assert_equals_csv(held, tracked_run, timing_redone=True)
    assert run.data.params == {key: str(as_hyper_parameter(value)) for key, value in saved_config(tracked_run).items()}


# --- W&B: the offline run's files ------------------------------------------------------------------------

def wandb_records(path: Path):
    """The records of a W&B offline run file, parsed with wandb's own protobuf schema. The file is a
    LevelDB-style log: a 7-byte header, then 32 KiB blocks of chunks, each with a 7-byte header
    (checksum, length, type: 1 full, 2 first, 3 middle, 4 last); a block's last < 7 bytes are padding."""
    from wandb.proto.wandb_internal_pb2 import Record
    data, block = path.read_bytes(), 32768
    assert data[:4] == b":W&B"
    position, payload = 7, b""
    while position + 7 <= len(data):
        if block - position % block < 7:
            position += block - position % block
            continue
        _, length, kind = struct.unpack("<IHB", data[position:position + 7])
        payload += data[position + 7:position + 7 + length]
        position += 7 + length
        if kind in (1, 4):
            yield Record.FromString(payload)
            payload = b""


def wandb_runs(run_dir: Path) -> list[Path]:
    """The offline runs of this run directory's W&B run, in the order they were written."""
    pytest.importorskip("wandb")
    run_id = json.loads((run_dir / "trackers.json").read_text())["wandb"]
    return sorted((run_dir / "wandb").glob(f"offline-run-*-{run_id}"))


def wandb_history(run_dir: Path) -> list[tuple[int, dict]]:
    """(step, {key: value}) of every history record of the run, resumed parts included."""
    rows = []
    for offline in wandb_runs(run_dir):
        for record in wandb_records(next(offline.glob("run-*.wandb"))):
            if record.WhichOneof("record_type") == "history":
                row = {}
                for item in record.history.item:  # an image's fields come as nested keys [key, field]
                    key, *field = [item.key] if item.key else item.nested_key
                    value = json.loads(item.value_json)
                    if field:
                        row.setdefault(key, {})[field[0]] = value
                    elif not key.startswith("_"):
                        row[key] = value
                rows.append((record.history.step.num, row))
    return rows


def wandb_panels(run_dir: Path) -> dict[tuple[str, int], np.ndarray]:
    offline = wandb_runs(run_dir)
    panels = {}
    for step, row in wandb_history(run_dir):
        for key, value in row.items():
            if isinstance(value, dict) and value.get("_type") == "image-file":
                file = next(run / "files" / value["path"] for run in offline if (run / "files" / value["path"]).is_file())
                panels[(key, step)] = decode_png(file.read_bytes())
    return panels


def test_wandb_offline_run_holds_the_csvs_and_the_config(tracked_run):
    assert len(wandb_runs(tracked_run)) == 2  # the first process's and the resumed one's, one run id
    held = {}
    for step, row in wandb_history(tracked_run):
        for key, value in row.items():
            if not isinstance(value, dict):
                held.setdefault(key, []).append((step, value))
    assert_equals_csv(held, tracked_run, timing_redone=True)

    run = next(record.run for record in wandb_records(next(wandb_runs(tracked_run)[0].glob("run-*.wandb")))
               if record.WhichOneof("record_type") == "run")
    config = {item.key: json.loads(item.value_json) for item in run.config.update if item.key != "_wandb"}
    assert config == saved_config(tracked_run)


# --- Panels: the same images in every tracker, and the right ones --------------------------------------

def test_every_tracker_shows_the_extreme_test_images_of_each_class(tracked_run, tmp_path):
    readers = {"tensorboard": lambda: tensorboard_panels(tracked_run), "wandb": lambda: wandb_panels(tracked_run),
               "mlflow": lambda: mlflow_panels(tracked_run, tmp_path)}
    panels = {name: readers[name]() for name in INSTALLED}
    classes = ["checker", "stripes"]
    expected_keys = {(f"heatmaps/{c}/{kind}", step) for c in classes for kind in PANEL_KINDS for step in EVAL_STEPS}
    for name, held in panels.items():
        assert held.keys() == expected_keys, name
    first = panels[INSTALLED[0]]
    for name, held in panels.items():
        assert all(np.array_equal(held[key], first[key]) for key in expected_keys), name

    # step 4's panels from the final model, recomputed: the highest-scored normal image and the highest-
    # and lowest-scored anomalous ones, each beside its mask and heatmap, under a caption
    checkpoint = load_checkpoint(tracked_run / "checkpoint.pth")
    cfg = checkpoint["config"]
    model = model_from_checkpoint(checkpoint).eval()
    size = cfg["map_size"]
    for name in classes:
        test_set = build_test_set(cfg, name)
        outputs = infer_class(model, test_set, cfg, torch.device("cpu"))
        scores, labels = outputs.scores.tolist(), outputs.labels.tolist()
        order = sorted(range(len(scores)), key=lambda i: scores[i])
        normal = [i for i in order if labels[i] == 0]
        anomalous = [i for i in order if labels[i] == 1]
        for kind, index in (("worst_normal", normal[-1]), ("best_anomalous", anomalous[-1]),
                            ("worst_anomalous", anomalous[0])):
            panel = first[(f"heatmaps/{name}/{kind}", 4)]
            assert panel.shape == (22 + size, 3 * size + 2 * 4, 3)
            image = to_display_image(test_set[index][0], size, *input_normalization(cfg))
            assert np.array_equal(panel[22:, :size], image), (name, kind)
            mask = outputs.masks[index].numpy()
            assert np.array_equal(panel[22:, size + 4:2 * size + 4, 0] > 127, mask), (name, kind)


def test_a_rollback_leaves_every_step_once(tracked_run, tmp_path):
    """Rolled back from step 5 to step 2, then on to 6: TensorBoard holds the new values of steps 3-5, W&B
    and MLflow the first ones (they cannot delete points); each holds every step once, and trackers.json
    remembers what was sent in case the run is resumed."""
    cfg = {**saved_config(tracked_run), "logger": INSTALLED, "run_name": "rolled"}
    run_dir = tmp_path / "rolled"
    run_dir.mkdir()
    if "mlflow" in INSTALLED:  # a copy of a store MLflow created already, sparing its database migrations
        shutil.copy(tracked_run / "mlflow.db", run_dir / "mlflow.db")
    tracked = trackers.Trackers(cfg, run_dir, 0, {"train": 0, "eval": 0})
    for step in range(1, 6):
        tracked.log("train", step, {"train/loss": float(step)})
    tracked.restart_at(2)
    for step in range(3, 7):
        tracked.log("train", step, {"train/loss": 10.0 + step})
    tracked.close()
    assert json.loads((run_dir / "trackers.json").read_text())["sent"] == {"train": 5, "eval": 0}

    rewritten = [(1, 1.0), (2, 2.0), (3, 13.0), (4, 14.0), (5, 15.0), (6, 16.0)]
    kept = [(1, 1.0), (2, 2.0), (3, 3.0), (4, 4.0), (5, 5.0), (6, 16.0)]
    if "tensorboard" in INSTALLED:
        assert [(e.step, e.value) for e in tensorboard_events(run_dir).Scalars("train/loss")] == rewritten
    if "mlflow" in INSTALLED:
        client, run = mlflow_run(run_dir)
        history = client.get_metric_history(run.info.run_id, "train/loss")
        assert sorted((m.step, m.value) for m in history) == kept
    if "wandb" in INSTALLED:
        assert [(step, row["train/loss"]) for step, row in wandb_history(run_dir)] == kept


def test_csv_and_png_are_still_written(tracked_run):
    for name in ("train_steps.csv", "eval_metrics.csv", "curves.png", "metrics.png", "per_class.png"):
        assert (tracked_run / name).is_file(), name


def test_missing_tracker_package_is_one_line_before_any_run_directory(synthetic_data, tiny_weights, tmp_path,
                                                                      monkeypatch, capsys):
    monkeypatch.setitem(trackers.PACKAGES, "wandb", (("wandb_is_not_installed",), "pip install wandb"))
    result = run_in_process(train_uni, tiny_run_args(synthetic_data, tiny_weights, tmp_path, logger="wandb"), capsys)
    assert (result.returncode, result.stderr) == (1, "error: logger wandb needs wandb_is_not_installed: pip install "
                                                     "wandb (or pip install -r requirements-trackers.txt)\n")
    assert not (tmp_path / "run").exists()
    result = run_in_process(train_uni, tiny_run_args(synthetic_data, tiny_weights, tmp_path, logger="tb"), capsys)
    assert result.returncode == 1 and result.stderr.count("\n") == 1
    assert result.stderr.endswith("'logger' must be one of tensorboard, wandb, mlflow, got 'tb'\n")
