"""int8 for ONNX Runtime (export.py --precision int8): SmoothQuant's balancing of LayerNorm -> Linear pairs
in PyTorch, then dynamic quantization of the exported graph. export.py checks the result against fp32."""
import copy
import tempfile
from contextlib import contextmanager
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


@contextmanager
def input_peaks(model: nn.Module):
    """While open, records max |input| per input channel of the Linear of each of `model`'s smoothable pairs
    that the forward passes run call as a module, by the Linear's qualified name. Open it around the passes
    that compute the fp32 reference, so the calibration costs no pass of its own."""
    peaks = {}
    names = {linear: name for name, linear in model.named_modules()}

    def record(linear, inputs, _):
        peak, name = inputs[0].abs().flatten(0, -2).amax(0), names[linear]
        peaks[name] = torch.maximum(peaks[name], peak) if name in peaks else peak
    hooks = [linear.register_forward_hook(record) for _, linear in smoothable_pairs(model)]
    try:
        yield peaks
    finally:
        for hook in hooks:
            hook.remove()


def smoothed(model: nn.Module, peaks: dict[str, torch.Tensor]) -> nn.Module:
    """A copy of `model` with the activation outliers of its LayerNorm -> Linear pairs moved into the weights,
    as SmoothQuant does (Xiao et al. 2023): per input channel, s = peak|x| ** SMOOTHING / peak|w| ** (1 -
    SMOOTHING) with the input peaks `input_peaks` recorded; the LayerNorm's weight and bias are divided by s,
    the Linear's weight columns multiplied by it. The same function in real arithmetic (the fp32 parity check
    proves it to its tolerance), but dynamic quantization gives all channels of an activation one uint8 scale,
    and real DINOv2 LayerNorm outputs carry channels 5-30x the median: smoothing halves the largest int8 errors
    (ViT-S/14, README). A Linear the forward pass does not call as a module (BEiT's qkv) is left as it is."""
    copied = copy.deepcopy(model)
    names = {linear: name for name, linear in copied.named_modules()}
    for norm, linear in smoothable_pairs(copied):
        if names[linear] not in peaks:
            continue
        weight_peaks = linear.weight.abs().amax(0).clamp(min=1e-5)
        scale = peaks[names[linear]].clamp(min=1e-5) ** SMOOTHING / weight_peaks ** (1 - SMOOTHING)
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
