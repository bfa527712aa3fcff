"""Weight quantization: RTN, GPTQ, AWQ and FP8, written as GPTQ, AWQ or compressed-tensors checkpoints.

from llmctl.core.quantize import QuantizeOptions, quantize_model, load_quantized
quantize_model("model_dir", Path("out"), QuantizeOptions(method="gptq", bits=4, group_size=64))
model = load_quantized("out")
"""

from llmctl.core.quantize.calib import CalibrationSpec, calibration_ids, run_layerwise
from llmctl.core.quantize.formats import QuantizedWeight
from llmctl.core.quantize.run import METHODS, QuantizeOptions, quantize_loaded, quantize_model
from llmctl.core.quantize.runtime import QuantLinear, load_quantized

__all__ = [
    "METHODS",
    "CalibrationSpec",
    "QuantLinear",
    "QuantizeOptions",
    "QuantizedWeight",
    "calibration_ids",
    "load_quantized",
    "quantize_loaded",
    "quantize_model",
    "run_layerwise",
]
