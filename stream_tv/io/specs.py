"""Dtypes and :class:`TensorSpec`: where one tensor lives (file, byte range, dtype, shape).

>>> parse_dtype("bf16"), dtype_name(torch.float16)
(torch.bfloat16, 'F16')
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .inputs import FileIdentity

MAX_DIM = 2**63 - 1  # torch sizes are signed 64-bit integers


# safetensors dtype string -> (torch dtype, bytes per element)
DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
for _name, _attr in (
    ("U16", "uint16"),
    ("U32", "uint32"),
    ("U64", "uint64"),
    ("F8_E4M3", "float8_e4m3fn"),
    ("F8_E5M2", "float8_e5m2"),
):
    if hasattr(torch, _attr):
        DTYPES[_name] = getattr(torch, _attr)
DTYPE_NAMES: dict[torch.dtype, str] = {v: k for k, v in DTYPES.items()}
FLOAT_DTYPES = {torch.float64, torch.float32, torch.float16, torch.bfloat16}


def dtype_name(dtype: torch.dtype) -> str:
    """The safetensors name of a torch dtype: ``dtype_name(torch.bfloat16) == "BF16"``."""
    return DTYPE_NAMES[dtype]


def parse_dtype(text: str) -> torch.dtype:
    """``"bf16"``, ``"bfloat16"``, ``"BF16"``, ``"torch.float32"``, ``"fp32"`` -> torch dtype."""
    key = text.strip().lower().removeprefix("torch.")
    aliases = {
        "bf16": torch.bfloat16,
        "bfloat16": torch.bfloat16,
        "fp16": torch.float16,
        "f16": torch.float16,
        "float16": torch.float16,
        "half": torch.float16,
        "fp32": torch.float32,
        "f32": torch.float32,
        "float32": torch.float32,
        "float": torch.float32,
        "fp64": torch.float64,
        "f64": torch.float64,
        "float64": torch.float64,
        "double": torch.float64,
    }
    if key not in aliases:
        raise ValueError(f"unknown dtype {text!r}; use one of bf16, fp16, fp32, fp64")
    return aliases[key]


@dataclass(frozen=True)
class TensorSpec:
    """Where one tensor lives: file, absolute byte range, dtype and shape."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    file: Path
    start: int  # absolute offset of the first byte in ``file``
    end: int  # absolute offset one past the last byte
    # the file as it was when this header was read; the Reader checks it again on open
    source: FileIdentity | None = field(default=None, compare=False, repr=False)

    @property
    def nbytes(self) -> int:
        return self.end - self.start

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def itemsize(self) -> int:
        return self.dtype.itemsize

    @property
    def rows(self) -> int:
        """Length of the chunked dimension: ``shape[0]``, or ``numel`` for 0-D/1-D tensors."""
        return self.shape[0] if len(self.shape) >= 2 else max(self.numel, 0) if self.shape else 1

    @property
    def row_shape(self) -> tuple[int, ...]:
        return self.shape[1:] if len(self.shape) >= 2 else ()

    @property
    def row_numel(self) -> int:
        return math.prod(self.row_shape)

    @property
    def is_empty(self) -> bool:
        """No element: ``rows`` may still be huge (``[2**62, 0]``), so process it as one step."""
        return self.numel == 0

    @property
    def is_float(self) -> bool:
        return self.dtype in FLOAT_DTYPES

    @property
    def dtype_str(self) -> str:
        return dtype_name(self.dtype)
