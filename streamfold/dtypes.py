"""safetensors dtype names <-> numpy dtypes (bf16 and fp8 through ml_dtypes)."""
from __future__ import annotations

import ml_dtypes
import numpy as np

DTYPES: dict[str, np.dtype] = {
    "BOOL": np.dtype(np.bool_),
    "U8": np.dtype(np.uint8),
    "I8": np.dtype(np.int8),
    "U16": np.dtype(np.uint16),
    "I16": np.dtype(np.int16),
    "U32": np.dtype(np.uint32),
    "I32": np.dtype(np.int32),
    "U64": np.dtype(np.uint64),
    "I64": np.dtype(np.int64),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F32": np.dtype(np.float32),
    "F64": np.dtype(np.float64),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
}

# Float dtypes a fold can be computed in and written back to.
FOLDABLE = {"F16", "BF16", "F32", "F64"}
QUANTIZED = {"F8_E4M3", "F8_E5M2"}


def itemsize(dtype: str) -> int:
    return DTYPES[dtype].itemsize
