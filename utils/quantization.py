"""int8 for ONNX Runtime (export.py --precision int8): SmoothQuant's balancing of LayerNorm -> Linear pairs
in PyTorch, then dynamic quantization of the exported graph. export.py checks the result against fp32."""
import copy
import tempfile
from pathlib import Path

import torch
import torch.nn as nn

SMOOTHING = 0.75  # SmoothQuant's alpha: the share of a channel's activation peak moved into the weights


def smoothable_pairs(model: nn.Module) -> list[tuple[nn.LayerNorm, nn.Linear]]:
    """Each pre-norm block's (norm1, attn.qkv) and (norm2, mlp.fc1) where they are an affine LayerNorm and a
    Linear: the blocks of the encoders and of the decoder, whose LayerNorm output feeds that Linear alone."""
    pairs = []
    for block in model.modules():
        for norm, branch, linear in (("norm1", "attn", "qkv"), ("norm2", "mlp", "fc1")):
            first, second = getattr(block, norm, None), getattr(getattr(block, branch, None), linear, None)
            if isinstance(first, nn.LayerNorm) and first.elementwise_affine and isinstance(second, nn.Linear):
                pairs.append((first, second))
    return pairs


def input_peaks(graph: nn.Module, linears: list[nn.Linear], images: torch.Tensor,
                chunk: int) -> dict[nn.Linear, torch.Tensor]:
    """max |input| per input channel of each of `linears` that `graph` calls as a module on `images`."""
    peaks = {}

    def record(linear, inputs, _):
        peak = inputs[0].abs().flatten(0, -2).amax(0)
        peaks[linear] = torch.maximum(peaks[linear], peak) if linear in peaks else peak
    hooks = [linear.register_forward_hook(record) for linear in linears]
    for start in range(0, len(images), chunk):
        graph(images[start:start + chunk])
    for hook in hooks:
        hook.remove()
    return peaks


def smoothed(graph: nn.Module, images: torch.Tensor, chunk: int) -> nn.Module:
    """A copy of `graph` with the activation outliers of its LayerNorm -> Linear pairs moved into the weights,
    as SmoothQuant does (Xiao et al. 2023): per input channel, s = peak|x| ** SMOOTHING / peak|w| ** (1 -
    SMOOTHING) on `images`; the LayerNorm's weight and bias are divided by s, the Linear's weight columns
    multiplied by it. The same function in real arithmetic (the fp32 parity check proves it to its tolerance),
    but dynamic quantization gives all channels of an activation one uint8 scale, and real DINOv2 LayerNorm
    outputs carry channels 5-30x the median: smoothing halves the largest int8 errors (ViT-S/14, README). A Linear
    the forward pass does not call as a module (BEiT's qkv) is left as it is."""
    copied = copy.deepcopy(graph)
    pairs = smoothable_pairs(copied.model)
    peaks = input_peaks(copied, [linear for _, linear in pairs], images, chunk)
    for norm, linear in pairs:
        if linear not in peaks:
            continue
        weight_peaks = linear.weight.abs().amax(0).clamp(min=1e-5)
        scale = peaks[linear].clamp(min=1e-5) ** SMOOTHING / weight_peaks ** (1 - SMOOTHING)
        norm.weight.div_(scale)
        if norm.bias is not None:
            norm.bias.div_(scale)
        linear.weight.mul_(scale)
    return copied


def quantize(fp32: Path, int8: Path) -> None:
    """Dynamic int8 quantization (onnxruntime.quantization) of every MatMul with a constant weight, the linear
    layers of encoder, bottleneck and decoder: weights int8 per output channel in the file, activations uint8
    per tensor at run time (DynamicQuantizeLinear), int32 accumulation (MatMulInteger, VNNI where the CPU has
    it). The patch embedding (a Conv) and attention's products of two activations stay fp32. quant_pre_process
    first folds the exporter's weight transposes into the initializers (ORT's basic optimisations): without
    that no MatMul has a constant weight to quantize."""
    from onnxruntime.quantization import QuantType, quant_pre_process, quantize_dynamic
    with tempfile.TemporaryDirectory() as folder:
        folded = Path(folder) / "folded.onnx"
        quant_pre_process(str(fp32), str(folded), skip_symbolic_shape=True)
        quantize_dynamic(str(folded), str(int8), op_types_to_quantize=["MatMul"], per_channel=True,
                         weight_type=QuantType.QInt8)
