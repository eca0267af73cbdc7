"""ONNX export and the torch-free scorer: the exported graph reproduces PyTorch's maps and scores, the
scorer reproduces predict.py's scores without importing torch or this repository, and the exporter
refuses a file that disagrees."""
import csv
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

ort = pytest.importorskip("onnxruntime", reason="onnxruntime is not installed (pip install -r requirements-onnx.txt)")
onnx = pytest.importorskip("onnx", reason="onnx is not installed (pip install -r requirements-onnx.txt)")
pytest.importorskip("onnxscript", reason="onnxscript is not installed (pip install -r requirements-onnx.txt)")

import export  # noqa: E402
import predict_onnx  # noqa: E402
from conftest import ROOT, run_script, tiny_run_args  # noqa: E402
from datasets import load_image  # noqa: E402
from datasets.transforms import image_transform  # noqa: E402
from models import input_normalization  # noqa: E402
from utils.checkpoint import load_checkpoint, model_from_checkpoint  # noqa: E402
from utils.evaluation import predict_maps  # noqa: E402

# Runs a script with torch, torchvision, PIL and this repository's packages made unimportable.
WITHOUT_TORCH = ("import runpy, sys\n"
                 "for name in ('torch', 'torchvision', 'PIL', 'models', 'utils', 'datasets', 'sklearn'):\n"
                 "    sys.modules[name] = None\n"
                 "script, sys.argv = sys.argv[1], sys.argv[1:]\n"
                 "runpy.run_path(script, run_name='__main__')\n")


def run_without_torch(script: str, args: list, blocked_extra: tuple = ()) -> subprocess.CompletedProcess:
    code = WITHOUT_TORCH.replace("'sklearn')", "'sklearn'" + "".join(f", {b!r}" for b in blocked_extra) + ")")
    return subprocess.run([sys.executable, "-c", code, str(ROOT / script), *map(str, args)], capture_output=True,
                          text=True, cwd=tempfile.gettempdir())  # away from the repository


@pytest.fixture(scope="module")
def exported(trained_run, tiny_weights, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("onnx") / "tiny.onnx"
    result = run_script("export.py", ["--checkpoint", trained_run / "checkpoint.pth", "--out", out,
                                      "--encoder_weights", tiny_weights])
    assert "parity on 4 test images" in result.stdout and "wrote" in result.stdout
    return out


def test_the_graph_reproduces_pytorch_at_batch_1_and_3(exported, trained_run, tiny_weights, synthetic_data):
    checkpoint = load_checkpoint(trained_run / "checkpoint.pth", note=lambda _: None)
    cfg = {**checkpoint["config"], "encoder_weights": str(tiny_weights)}
    model = model_from_checkpoint(checkpoint, cfg).eval()
    session = ort.InferenceSession(str(exported), providers=["CPUExecutionProvider"])
    paths = sorted((synthetic_data / "checker" / "test").rglob("*.png"))[:4]
    normalised = torch.stack([image_transform(cfg["image_size"], cfg["crop_size"], *input_normalization(cfg))(
        load_image(p)) for p in paths])
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in input_normalization(cfg))
    for batch in (normalised[:1], normalised[1:]):  # the graph takes [0, 1] images and normalises inside
        with torch.no_grad():
            maps, scores = predict_maps(model, batch, cfg)  # predict.py's computation
        onnx_maps, onnx_scores = session.run(None, {"images": (batch * std + mean).numpy()})
        assert onnx_maps.shape == (len(batch), cfg["map_size"], cfg["map_size"]) and onnx_scores.shape == (len(batch),)
        assert np.abs(onnx_maps - maps.numpy()).max() <= 1e-4
        assert (np.abs(onnx_scores - scores.numpy()) / np.abs(scores.numpy())).max() <= 1e-5

    meta = session.get_modelmeta().custom_metadata_map
    thresholds = json.loads(meta["dinomaly.image_thresholds"])
    assert thresholds == {name: row["image_threshold"] for name, row in checkpoint["results"].items()}
    assert json.loads(meta["dinomaly.normalization"]) == {name: {
        "image": [row["score_min"], row["image_threshold"], row["score_max"]],
        "pixel": [row["map_min"], row["pixel_threshold"], row["map_max"]]} for name, row in checkpoint["results"].items()}
    assert f"encoder: {cfg['encoder']}" in meta["dinomaly.config"]
    assert (int(meta["dinomaly.image_size"]), int(meta["dinomaly.crop_size"])) == (cfg["image_size"], cfg["crop_size"])


def scores_of(folder: Path, column: str = "score") -> dict[str, float]:
    with open(folder / "scores.csv") as f:
        return {r["file"]: float(r[column]) for r in csv.DictReader(f)}


def test_the_torch_free_scorer_gives_predict_py_scores(exported, trained_run, tiny_weights, synthetic_data, tmp_path):
    """Raw and --normalize scores alike: the scale travels in the model's metadata."""
    images = synthetic_data / "stripes" / "test"
    normalized = ["--normalize", "--class_name", "stripes"]
    run_script("predict.py", ["--checkpoint", trained_run / "checkpoint.pth", "--images", images, "--out",
                              tmp_path / "torch", "--encoder_weights", tiny_weights] + normalized)
    result = run_without_torch("predict_onnx.py", ["--model", exported, "--images", images, "--out", tmp_path / "onnx"]
                               + normalized)
    assert result.returncode == 0, result.stderr[-3000:]
    ours, reference = scores_of(tmp_path / "onnx", "raw_score"), scores_of(tmp_path / "torch", "raw_score")
    assert set(ours) == set(reference) and len(ours) == 20  # 8 good, 4 of each of 3 defects
    assert all(abs(ours[k] - reference[k]) <= 1e-5 * abs(reference[k]) + 1e-6 for k in ours)
    row = load_checkpoint(trained_run / "checkpoint.pth", note=lambda _: None)["results"]["stripes"]
    slope = 0.5 / min(row["image_threshold"] - row["score_min"], row["score_max"] - row["image_threshold"])
    tolerance = slope * (1e-5 * row["score_max"] + 1e-6) + 2e-6  # the raw tolerance through the steepest side
    ours, reference = scores_of(tmp_path / "onnx"), scores_of(tmp_path / "torch")
    assert all(abs(ours[k] - reference[k]) <= tolerance for k in ours)
    assert 0 <= min(ours.values()) < 0.5 < max(ours.values()) <= 1
    assert sorted(p.name for p in (tmp_path / "onnx" / "heatmaps").iterdir()) == sorted(
        p.name for p in (tmp_path / "torch" / "heatmaps").iterdir())

    verdicts = run_without_torch("predict_onnx.py", ["--model", exported, "--images", images, "--threshold", "f1",
                                                     "--class_name", "stripes", "--no_heatmaps", "--out", tmp_path / "v"])
    assert verdicts.returncode == 0 and "anomalous" in (tmp_path / "v" / "scores.csv").read_text().splitlines()[0]


@pytest.mark.parametrize("height,width,size", [(128, 128, 448), (1024, 1024, 448), (600, 600, 392), (97, 97, 64)])
def test_the_scorers_resize_is_pils_bit_for_bit(height, width, size):
    image = np.random.default_rng(height).integers(0, 256, (height, width, 3), dtype=np.uint8)
    reference = np.asarray(Image.fromarray(image).resize((size, size), Image.BILINEAR))
    assert np.array_equal(predict_onnx.pil_resize(image, size), reference)


def test_non_square_resizes_are_within_one_grey_level():
    image = np.random.default_rng(0).integers(0, 256, (700, 300, 3), dtype=np.uint8)
    reference = np.asarray(Image.fromarray(image).resize((256, 256), Image.BILINEAR)).astype(int)
    assert np.abs(predict_onnx.pil_resize(image, 256).astype(int) - reference).max() <= 1


def test_the_scorer_finds_the_images_our_datasets_read():
    from datasets import IMG_EXTENSIONS
    assert predict_onnx.IMG_EXTENSIONS == IMG_EXTENSIONS


def test_centre_crop_rounds_as_torchvision():
    from torchvision.transforms import CenterCrop
    image = np.arange(9 * 7 * 3, dtype=np.uint8).reshape(9, 7, 3)
    want = CenterCrop(4)(torch.from_numpy(image).permute(2, 0, 1)).permute(1, 2, 0).numpy()
    assert np.array_equal(predict_onnx.center_crop(image, 4), want)


def test_a_graph_that_disagrees_is_not_written(trained_run, tiny_weights, tmp_path, monkeypatch, capsys):
    original = export.export_graph

    def export_a_perturbed_model(graph, crop_size, path):
        with torch.no_grad():
            graph.model.decoder[0].mlp.fc2.bias.add_(0.5)  # what reaches the file is not what is compared
        original(graph, crop_size, path)
        with torch.no_grad():
            graph.model.decoder[0].mlp.fc2.bias.sub_(0.5)
    monkeypatch.setattr(export, "export_graph", export_a_perturbed_model)
    out = tmp_path / "bad.onnx"
    from utils.run_setup import run_cli
    code = run_cli(export.main, ["--checkpoint", str(trained_run), "--out", str(out), "--encoder_weights",
                                 str(tiny_weights)], export.SCRIPT_ERRORS)
    err = capsys.readouterr().err
    assert code == 1 and "ONNX Runtime disagrees with PyTorch" in err and "not written" in err
    assert not out.exists() and not list(tmp_path.glob("*.part"))


@pytest.fixture(scope="module")
def exported_int8(trained_run, tiny_weights, tmp_path_factory) -> tuple[Path, str]:
    """The tiny run exported with --precision int8, and what the exporter printed."""
    out = tmp_path_factory.mktemp("onnx_int8") / "tiny_int8.onnx"
    result = run_script("export.py", ["--checkpoint", trained_run / "checkpoint.pth", "--out", out, "--encoder_weights",
                                      tiny_weights, "--precision", "int8"])
    return out, result.stdout


def open_as_exported(path: Path):
    """A session at the graph optimisation level the model's metadata names (basic when it names none)."""
    meta = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).get_modelmeta().custom_metadata_map
    options = ort.SessionOptions()
    options.graph_optimization_level = getattr(ort.GraphOptimizationLevel,
                                               meta.get("dinomaly.graph_optimization_level", "ORT_ENABLE_BASIC"))
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def labelled_test_set(cfg: dict, name: str) -> tuple[np.ndarray, torch.Tensor, torch.Tensor]:
    """All test images of a class in [0, 1], their labels and their masks at map size, as evaluation reads them."""
    from datasets import TestSet, build_test_set
    from utils.evaluation import binarise_masks
    test_set = TestSet(build_test_set(cfg, name).samples, cfg["image_size"], cfg["crop_size"], (0.0,) * 3, (1.0,) * 3)
    items = [test_set[i] for i in range(len(test_set))]
    masks = binarise_masks(torch.stack([item[1] for item in items]), cfg["map_size"], cfg["gt_threshold"])
    return torch.stack([item[0] for item in items]).numpy(), torch.tensor([item[2] for item in items]), masks


def test_the_int8_export_ranks_and_scores_as_fp32(exported_int8, exported, trained_run, synthetic_data):
    """On the whole synthetic test set, image by image: fp32's order of every pair of images more than 1% of the
    score range apart, and I-AUROC and P-AUROC per class within 0.5 points of fp32's."""
    from utils.metrics import ranking_metrics
    path, printed = exported_int8
    assert "parity on 4 test images" in printed and "wrote" in printed
    assert "int8 against fp32 on 32 test images" in printed and "ranking kept" in printed and "P-AUROC" in printed
    model = onnx.load(str(path))
    assert "MatMulInteger" in {node.op_type for node in model.graph.node}
    assert sum(t.data_type == onnx.TensorProto.INT8 for t in model.graph.initializer) >= 10
    assert path.stat().st_size < exported.stat().st_size / 2
    meta = {p.key: p.value for p in model.metadata_props}
    fp32_meta = {p.key: p.value for p in onnx.load(str(exported), load_external_data=False).metadata_props}
    assert meta["dinomaly.precision"] == "int8"
    assert meta["dinomaly.graph_optimization_level"] == export.INT8_OPTIMIZATION
    assert meta["dinomaly.normalization"] == fp32_meta["dinomaly.normalization"]

    cfg = load_checkpoint(trained_run / "checkpoint.pth", note=lambda _: None)["config"]
    fp32, int8 = open_as_exported(exported), open_as_exported(path)
    for name in ("checker", "stripes"):
        images, labels, masks = labelled_test_set(cfg, name)
        (fp32_maps, fp32_scores), (int8_maps, int8_scores) = (
            [np.concatenate(parts) for parts in zip(*(session.run(None, {"images": images[i:i + 1]})
                                                      for i in range(len(images))))] for session in (fp32, int8))
        resolution = 0.01 * (fp32_scores.max() - fp32_scores.min())
        swapped = [(i, j) for i in range(len(images)) for j in range(len(images))
                   if fp32_scores[i] > fp32_scores[j] + resolution and int8_scores[i] <= int8_scores[j]]
        assert not swapped
        for truth, (ours, reference) in ((labels, (int8_scores, fp32_scores)), (masks, (int8_maps, fp32_maps))):
            assert abs(ranking_metrics(torch.from_numpy(ours), truth)["auroc"]
                       - ranking_metrics(torch.from_numpy(reference), truth)["auroc"]) <= 0.005


def test_a_damaged_int8_model_is_not_written(trained_run, tiny_weights, tmp_path, monkeypatch, capsys):
    from conftest import run_in_process
    from test_usability import assert_one_line_error
    original = export.quantize

    def quantize_and_damage(fp32, int8):
        original(fp32, int8)
        model = onnx.load(str(int8))
        rng = np.random.default_rng(0)
        for tensor in model.graph.initializer:
            if tensor.data_type == onnx.TensorProto.INT8:
                noise = rng.integers(-127, 128, tuple(tensor.dims), dtype=np.int8)
                tensor.CopyFrom(onnx.numpy_helper.from_array(noise, tensor.name))
        onnx.save(model, str(int8))
    monkeypatch.setattr(export, "quantize", quantize_and_damage)
    out = tmp_path / "bad_int8.onnx"
    result = run_in_process(export, ["--checkpoint", trained_run, "--out", out, "--encoder_weights", tiny_weights,
                                     "--precision", "int8"], capsys)
    assert_one_line_error(result, "disagrees with fp32")
    assert "int8 against fp32 on 32 test images" in result.stdout and "ranking changed" in result.stdout
    assert f"{out} not written" in result.stderr
    assert not out.exists() and not list(tmp_path.glob("*.part"))


def test_the_torch_free_scorer_runs_the_int8_model(exported_int8, synthetic_data, tmp_path):
    """Opened at the level the metadata names, image by image, with --normalize on the fp32 run's scale."""
    path, _ = exported_int8
    model = predict_onnx.ExportedModel(path)
    level = model.session.get_session_options().graph_optimization_level
    assert level == getattr(ort.GraphOptimizationLevel, export.INT8_OPTIMIZATION)
    images = synthetic_data / "stripes" / "test"
    result = run_without_torch("predict_onnx.py", ["--model", path, "--images", images, "--out", tmp_path / "int8",
                                                   "--normalize", "--class_name", "stripes", "--no_heatmaps"])
    assert result.returncode == 0, result.stderr[-3000:]
    raw, shown = scores_of(tmp_path / "int8", "raw_score"), scores_of(tmp_path / "int8")
    session = open_as_exported(path)
    for file, score in raw.items():
        crop = predict_onnx.preprocess(predict_onnx.read_rgb(Path(file)), model.image_size, model.crop_size)[None]
        assert abs(score - float(session.run(None, {"images": crop})[1][0])) <= 1e-6
    assert len(raw) == 20 and 0 <= min(shown.values()) < 0.5 < max(shown.values()) <= 1


def test_every_class_of_a_separated_run(synthetic_data, tiny_weights, tmp_path):
    run_script("train_sep.py", tiny_run_args(synthetic_data, tiny_weights, tmp_path, total_iters=4, warmup_iters=1))
    run = tmp_path / "run"
    assert export.checkpoints_to_export(run, "stripes") == [run / "stripes" / "checkpoint.pth"]
    result = run_script("export.py", ["--checkpoint", run, "--out", tmp_path / "models", "--encoder_weights",
                                      tiny_weights])
    assert result.stdout.count("parity on 4 test images") == 2
    for name in ("checker", "stripes"):
        meta = ort.InferenceSession(str(tmp_path / "models" / f"{name}.onnx")).get_modelmeta().custom_metadata_map
        assert json.loads(meta["dinomaly.classes"]) == [name] and name in json.loads(meta["dinomaly.image_thresholds"])


def test_mistakes_on_the_export_and_scoring_paths_are_one_line(exported, trained_run, tiny_weights, synthetic_data,
                                                               tmp_path, capsys):
    import evaluate
    import predict
    from conftest import run_in_process
    from test_usability import assert_one_line_error
    not_onnx = tmp_path / "not.onnx"
    not_onnx.write_text("text")
    taken = tmp_path / "taken"
    taken.write_text("a file")
    images = synthetic_data / "checker" / "test" / "good"
    cases = [(["--model", tmp_path / "none.onnx", "--images", images, "--out", tmp_path / "o"], "none.onnx"),
             (["--model", not_onnx, "--images", images, "--out", tmp_path / "o"], str(not_onnx)),
             (["--model", exported, "--images", tmp_path / "no_images", "--out", tmp_path / "o"], "no_images"),
             (["--model", exported, "--images", images, "--out", taken], f"{taken} is a file"),
             (["--model", exported, "--images", images, "--threshold", "f1", "--out", tmp_path / "o"], "--class_name")]
    for args, culprit in cases:
        assert_one_line_error(run_without_torch("predict_onnx.py", args), culprit)
    old = onnx.load(str(exported))  # an export from before the score scale was stored
    kept = [(p.key, p.value) for p in old.metadata_props if p.key != "dinomaly.normalization"]
    del old.metadata_props[:]
    for key, value in kept:
        old.metadata_props.add(key=key, value=value)
    onnx.save(old, str(tmp_path / "old.onnx"))
    assert_one_line_error(run_without_torch("predict_onnx.py", ["--model", tmp_path / "old.onnx", "--images", images,
                                                                "--normalize", "--out", tmp_path / "o"]),
                          f"{tmp_path / 'old.onnx'} stores no score scale")
    no_runtime = run_without_torch("predict_onnx.py", cases[0][0], blocked_extra=("onnxruntime",))
    assert_one_line_error(no_runtime, "pip install -r requirements-onnx.txt")

    for args, culprit in (
            (["--checkpoint", trained_run, "--out", tmp_path / "model.txt"], "ending in .onnx"),
            (["--checkpoint", tmp_path / "nothing", "--out", tmp_path / "m.onnx"], str(tmp_path / "nothing")),
            (["--checkpoint", trained_run, "--out", taken / "m.onnx"], f"{taken} is a file"),
            (["--checkpoint", trained_run, "--out", tmp_path / "m.onnx", "--precision", "int4"], "--precision int4"),
            (["--checkpoint", trained_run, "--out", tmp_path / "m.onnx", "--encoder_weights", not_onnx], str(not_onnx))):
        assert_one_line_error(run_in_process(export, args, capsys), culprit)
    assert not (tmp_path / "m.onnx").exists()
    for script, args in ((predict, ["--checkpoint", trained_run, "--images", images, "--out", taken]),
                         (evaluate, ["--checkpoint", trained_run, "--out", taken / "eval"])):
        assert_one_line_error(run_in_process(script, args + ["--encoder_weights", tiny_weights], capsys),
                              f"{taken} is a file")
