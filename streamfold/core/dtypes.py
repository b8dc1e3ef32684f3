"""safetensors dtype names <-> numpy dtypes (bf16 and fp8 through ml_dtypes)."""
from __future__ import annotations

from collections.abc import Iterator, Mapping

import numpy as np

# ml_dtypes is imported on first use of one of its dtypes, not at import: its import costs ~0.8 s
# (numpy 2.4 registering its ufunc loops), which every `--help`, usage error, `plan` and refusal paid.
_ML_NAMES = {
    "BF16": "bfloat16",
    "F8_E4M3": "float8_e4m3fn",
    "F8_E5M2": "float8_e5m2",
    # E8M0: a bare exponent, 2^(u - 127) (255 is NaN); FP8 block and MX scales (``scale_fmt: ue8m0``)
    "F8_E8M0": "float8_e8m0fnu",
    # AMD's FNUZ float8: parsed so the refusal can name them (streamfold.quant.formats refuses them)
    "F8_E4M3FNUZ": "float8_e4m3fnuz",
    "F8_E5M2FNUZ": "float8_e5m2fnuz",
}
_LOADED: dict[str, np.dtype] = {
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
    "F32": np.dtype(np.float32),
    "F64": np.dtype(np.float64),
}
_NAMES = (*_LOADED, *_ML_NAMES)
_ITEMSIZES = {**{k: d.itemsize for k, d in _LOADED.items()}, "BF16": 2,
              **{k: 1 for k in _ML_NAMES if k.startswith("F8_")}}


class _Dtypes(Mapping):
    """safetensors dtype name -> numpy dtype; the ml_dtypes ones resolved on first lookup."""

    def __getitem__(self, name: str) -> np.dtype:
        got = _LOADED.get(name)
        if got is None:
            import ml_dtypes  # KeyError below for names that are neither
            got = _LOADED[name] = np.dtype(getattr(ml_dtypes, _ML_NAMES[name]))
        return got

    def __contains__(self, name: object) -> bool:
        return name in _ITEMSIZES

    def __iter__(self) -> Iterator[str]:
        return iter(_NAMES)

    def __len__(self) -> int:
        return len(_NAMES)


DTYPES: Mapping[str, np.dtype] = _Dtypes()

# Float dtypes a fold can be computed in and written back to.
FOLDABLE = {"F16", "BF16", "F32", "F64"}
QUANTIZED = {"F8_E4M3", "F8_E5M2", "F8_E8M0", "F8_E4M3FNUZ", "F8_E5M2FNUZ"}


def itemsize(dtype: str) -> int:
    """Bytes per element of a safetensors dtype (without importing ml_dtypes)."""
    return _ITEMSIZES[dtype]


def widen_bf16(raw: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """bf16 values (any view of their bytes) as float32, exactly: a bf16 is the high half of a
    float32 word, so this is a 16-bit shift (several times faster than ml_dtypes' cast)."""
    bits = raw.view(np.uint16)
    if out is None:
        out = np.empty(bits.shape, dtype=np.float32)
    np.left_shift(bits, 16, out=out.view(np.uint32), dtype=np.uint32)
    return out
