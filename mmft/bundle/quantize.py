"""int8 encoders with ONNX Runtime's quantizer: dynamic for the text tower, static for the image tower.

Text tower (transformer MatMuls): weights int8 per output channel, activations quantized on the fly per
batch (`quantize_dynamic`), so no calibration data is needed and any caption length works.
Image tower (convolutions): weights int8 per channel, activations uint8 with ranges calibrated on a
sample of gallery images (`quantize_static`, QDQ format, which ONNX Runtime's CPU kernels fuse into
integer convolutions). The recall this costs is measured on the evaluation sets and written into the
model card (mmft.bundle.measure), never assumed.
Nothing here imports torch.
"""
from __future__ import annotations

import contextlib
import logging
import tempfile
from pathlib import Path

import numpy as np
from onnxruntime.quantization import CalibrationDataReader

IMAGE_INT8, TEXT_INT8 = "image_encoder.int8.onnx", "text_encoder.int8.onnx"
# Operators quantized in each tower; everything else (LayerNorm, softmax, pooling, heads' norms) stays fp32.
TEXT_OPS = ["MatMul", "Gemm"]
IMAGE_OPS = ["Conv", "MatMul", "Gemm"]


@contextlib.contextmanager
def _quiet():
    """onnxruntime's quantizer logs a line per tensor on the root logger at INFO: keep the console clear."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(max(level, logging.WARNING))
    try:
        yield
    finally:
        root.setLevel(level)


def _preprocessed(model_in: Path, tmp: Path) -> Path:
    """ONNX Runtime's recommended pre-pass (graph optimisation + shape inference) before quantizing."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    out = tmp / f"{model_in.stem}.pre.onnx"
    # symbolic shape inference does not follow the dynamic sequence axis of exported text towers; ONNX's own
    # shape inference is enough for the quantizer
    quant_pre_process(str(model_in), str(out), skip_symbolic_shape=True)
    return out


def quantize_text(model_in: str | Path, model_out: str | Path) -> dict:
    """Dynamic int8 quantization of the text tower's MatMuls. Returns what the manifest records."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with tempfile.TemporaryDirectory(prefix="mmft-quant-") as tmp, _quiet():
        pre = _preprocessed(Path(model_in), Path(tmp))
        quantize_dynamic(str(pre), str(model_out), op_types_to_quantize=TEXT_OPS, per_channel=True,
                         weight_type=QuantType.QInt8)
    return {"method": "dynamic", "ops": TEXT_OPS, "weights": "int8 per channel",
            "activations": "uint8, ranges per batch at run time"}


class _Calibration(CalibrationDataReader):
    """(N, 3, H, W) float32 pixels handed to the calibrator in batches."""

    def __init__(self, input_name: str, pixels: np.ndarray, batch_size: int = 16):
        starts = range(0, len(pixels), batch_size)
        self.batches = iter([{input_name: pixels[s:s + batch_size]} for s in starts])

    def get_next(self):
        return next(self.batches, None)


def quantize_image(model_in: str | Path, model_out: str | Path, calibration: np.ndarray, *,
                   input_name: str = "pixel_values") -> dict:
    """Static int8 quantization of the image tower, activation ranges from `calibration` (N, 3, H, W)."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    if len(calibration) == 0:
        raise ValueError("static quantization of the image tower needs calibration images; pass a gallery "
                         "sample (--calibration SHARDS)")
    reader = _Calibration(input_name, np.asarray(calibration, np.float32))
    with tempfile.TemporaryDirectory(prefix="mmft-quant-") as tmp, _quiet():
        pre = _preprocessed(Path(model_in), Path(tmp))
        quantize_static(str(pre), str(model_out), reader, quant_format=QuantFormat.QDQ,
                        op_types_to_quantize=IMAGE_OPS, per_channel=True, activation_type=QuantType.QUInt8,
                        weight_type=QuantType.QInt8, calibrate_method=CalibrationMethod.MinMax)
    return {"method": "static (QDQ)", "ops": IMAGE_OPS, "weights": "int8 per channel",
            "activations": "uint8, MinMax ranges", "calibration_images": len(calibration)}
