"""The TensorRT side: device profiles (``spectrt devices``), optimization profiles, memory estimates, the
offline parser check (``check``), engine builds (``build``) and timing (``profile``). Depends on
``spectrt.runtime`` only; tensorrt, polygraphy and onnx are imported where they are used.
"""
from spectrt.profiles.device import (DEVICES, PRECISIONS, PROFILE_DIR, QUANTIZED_PRECISIONS, DeviceProfile,
                                     ProfileError, list_profiles, load_profile, parse_version)
from spectrt.profiles.memory import estimate_memory
from spectrt.profiles.shapes import ShapeProfile, dim_ranges, effective_max_context, optimization_profiles

__all__ = [
    "DEVICES", "DeviceProfile", "ProfileError", "ShapeProfile", "PRECISIONS", "PROFILE_DIR", "QUANTIZED_PRECISIONS",
    "list_profiles", "load_profile", "parse_version", "dim_ranges", "optimization_profiles",
    "effective_max_context", "estimate_memory",
]
