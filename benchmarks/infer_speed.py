"""Inference speed: images/s and latency per batch, PyTorch against ONNX Runtime, on random images.

    python benchmarks/infer_speed.py --encoder_weights random --device cpu              # the recipe ViT-B/14 reg4 at 392
    python benchmarks/infer_speed.py --encoder dinov3_vit_base_16 --encoder_weights random --image_size 512 --crop_size 448

Each runtime scores batches of 1 and 16 (--batch_sizes) from the image to the smoothed map and the score:
  torch fp32            eager PyTorch, the recipe's computation
  torch bf16            predict.py --precision bf16: bf16 autocast of encoder and decoder, their matrix
                        weights cast once (CUDA, or a CPU with native bf16; skipped where it would be emulated)
  torch compile         torch.compile of the encoder and decoder blocks (only with --with_compile: minutes)
  onnxruntime CPU       the export.py graph in ONNX Runtime's CPU provider, as predict_onnx.py runs it
  onnxruntime CPU int8  that graph quantized as export.py --precision int8 does, as predict_onnx.py runs it
  onnxruntime CUDA      the fp32 graph on the CUDA provider, when onnxruntime-gpu and a GPU are there
The decoder is untrained (speed does not depend on the weights). Accepts every config key as --key value.
"""
import copy
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from export import INT8_OPTIMIZATION, ScoringGraph, export_graph, onnx_packages, ort_session, quantize  # noqa: E402
from models import build_model  # noqa: E402
from utils.config import parse_args  # noqa: E402
from utils.device import cpu_bf16_native, cpu_description, resolve_device, store_weights_for_autocast  # noqa: E402
from utils.rng import seed_everything  # noqa: E402


def seconds_per_batch(run, batch: torch.Tensor, repeats: int, synchronize) -> float:
    """The median of `repeats` timed calls after one warm-up call."""
    run(batch)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run(batch)
        synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def torch_runners(graph: ScoringGraph, cfg: dict, device: torch.device, with_compile: bool) -> dict:
    def eager(precision):
        scoring = ScoringGraph(store_weights_for_autocast(copy.deepcopy(graph.model), precision), cfg, precision)
        return lambda batch: scoring(batch.to(device))
    runners = {"torch fp32": eager("fp32")}
    if device.type == "cuda" or cpu_bf16_native():
        runners["torch bf16"] = eager("bf16")  # as predict.py --precision bf16 runs it
    if with_compile:
        compiled = ScoringGraph(graph.model, cfg).to(device).eval()
        for block in [*compiled.model.encoder.blocks, *compiled.model.decoder]:
            block.compile()
        runners["torch compile"] = lambda batch: compiled(batch.to(device))
    return runners


def onnx_runners(graph: ScoringGraph, cfg: dict, folder: Path) -> dict:
    """The fp32 graph on each provider at hand, and its int8 quantization on the CPU as predict_onnx.py runs it:
    at the level export.py gives it, image by image (unsmoothed: smoothing changes weight values, not the work)."""
    _, ort = onnx_packages()
    path, int8 = folder / "model.onnx", folder / "model_int8.onnx"
    export_graph(graph.cpu(), cfg["crop_size"], path)
    quantize(path, int8)
    runners = {}
    for provider, name in (("CPUExecutionProvider", "onnxruntime CPU"), ("CUDAExecutionProvider", "onnxruntime CUDA")):
        if provider in ort.get_available_providers():
            session = ort_session(path, provider)
            runners[name] = lambda batch, session=session: session.run(None, {"images": batch.numpy()})
    int8_session = ort_session(int8, "CPUExecutionProvider", INT8_OPTIMIZATION)
    runners["onnxruntime CPU int8"] = lambda batch: [int8_session.run(None, {"images": image[None].numpy()})
                                                     for image in batch]
    return runners


def main(argv: list[str]) -> None:
    extra = [("--batch_sizes", dict(default="1,16")), ("--repeats", dict(type=int, default=5)),
             ("--with_compile", dict(action="store_true"))]
    cfg, args = parse_args(argv, str(ROOT / "configs" / "mvtec_uni.yaml"), __doc__, extra=extra)
    device = resolve_device(cfg["device"])
    seed_everything(cfg["seed"])
    graph = ScoringGraph(build_model(cfg), cfg).eval()
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    print(f"encoder {cfg['encoder']}  crop {cfg['crop_size']}  device {device}  threads {torch.get_num_threads()}")
    print(f"cpu: {cpu_description()}")
    print(f"{'runtime':<22}{'batch':>6}{'latency ms':>12}{'images/s':>10}")
    with tempfile.TemporaryDirectory() as folder:
        runners = {**onnx_runners(graph, cfg, Path(folder)), **torch_runners(graph.to(device), cfg, device,
                                                                               args.with_compile)}
        for name, run in runners.items():
            for size in (int(b) for b in args.batch_sizes.split(",")):
                batch = torch.rand(size, 3, cfg["crop_size"], cfg["crop_size"])
                seconds = seconds_per_batch(run, batch, args.repeats, sync if name.startswith("torch") else lambda: None)
                print(f"{name:<22}{size:>6}{seconds * 1000:>12.1f}{size / seconds:>10.2f}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
