"""Dtypes and :class:`TensorSpec`: where one tensor lives (file, byte range, dtype, shape).

>>> import torch
>>> parse_dtype("bf16"), dtype_name(torch.float16), DTYPE_SIZES["BF16"]
(torch.bfloat16, 'F16', 2)
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import InputError
from .inputs import FileIdentity

if TYPE_CHECKING:
    import torch

MAX_DIM = 2**63 - 1  # torch sizes are signed 64-bit integers

#: safetensors dtype name -> (bytes per element, torch's name for it). No torch here: reading
#: headers (``inspect``) must not pay for importing it.
_DTYPE_INFO: dict[str, tuple[int, str]] = {
    "F64": (8, "float64"),
    "F32": (4, "float32"),
    "F16": (2, "float16"),
    "BF16": (2, "bfloat16"),
    "I64": (8, "int64"),
    "I32": (4, "int32"),
    "I16": (2, "int16"),
    "I8": (1, "int8"),
    "U8": (1, "uint8"),
    "BOOL": (1, "bool"),
    "U16": (2, "uint16"),
    "U32": (4, "uint32"),
    "U64": (8, "uint64"),
    "F8_E4M3": (1, "float8_e4m3fn"),
    "F8_E5M2": (1, "float8_e5m2"),
}
DTYPE_SIZES: dict[str, int] = {k: size for k, (size, _) in _DTYPE_INFO.items()}
FLOAT_NAMES = frozenset({"F64", "F32", "F16", "BF16"})


class _TorchDtypes(Mapping):
    """safetensors name -> torch dtype, for the names the installed torch has; torch is
    imported on first use."""

    def __init__(self) -> None:
        self._table: dict[str, torch.dtype] | None = None

    def _load(self) -> dict[str, torch.dtype]:
        if self._table is None:
            import torch

            self._table = {
                k: getattr(torch, attr)
                for k, (_, attr) in _DTYPE_INFO.items()
                if hasattr(torch, attr)
            }
        return self._table

    def __getitem__(self, key: str) -> torch.dtype:
        return self._load()[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._load())

    def __len__(self) -> int:
        return len(self._load())


DTYPES: Mapping[str, torch.dtype] = _TorchDtypes()


def dtype_name(dtype: torch.dtype) -> str:
    """The safetensors name of a torch dtype: ``dtype_name(torch.bfloat16) == "BF16"``."""
    name = str(dtype).removeprefix("torch.")
    for k, (_, attr) in _DTYPE_INFO.items():
        if attr == name:
            return k
    raise KeyError(dtype)


def parse_dtype(text: str) -> torch.dtype:
    """``"bf16"``, ``"bfloat16"``, ``"BF16"``, ``"torch.float32"``, ``"fp32"`` -> torch dtype."""
    key = text.strip().lower().removeprefix("torch.")
    aliases = {
        "bf16": "BF16",
        "bfloat16": "BF16",
        "fp16": "F16",
        "f16": "F16",
        "float16": "F16",
        "half": "F16",
        "fp32": "F32",
        "f32": "F32",
        "float32": "F32",
        "float": "F32",
        "fp64": "F64",
        "f64": "F64",
        "float64": "F64",
        "double": "F64",
    }
    if key not in aliases:
        raise ValueError(f"unknown dtype {text!r}; use one of bf16, fp16, fp32, fp64")
    return DTYPES[aliases[key]]


@dataclass(frozen=True)
class TensorSpec:
    """Where one tensor lives: file, absolute byte range, dtype and shape."""

    name: str
    dtype_str: str  # the safetensors name ("BF16"); a torch dtype given here is converted
    shape: tuple[int, ...]
    file: Path
    start: int  # absolute offset of the first byte in ``file``
    end: int  # absolute offset one past the last byte
    # the file as it was when this header was read; the Reader checks it again on open
    source: FileIdentity | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        if not isinstance(self.dtype_str, str):
            object.__setattr__(self, "dtype_str", dtype_name(self.dtype_str))

    @property
    def dtype(self) -> torch.dtype:
        """The torch dtype (imports torch)."""
        try:
            return DTYPES[self.dtype_str]
        except KeyError:
            raise InputError(
                f"tensor {self.name!r} is {self.dtype_str}, which this torch has no dtype for",
                where=str(self.file),
                hint="upgrade torch",
            ) from None

    @property
    def nbytes(self) -> int:
        return self.end - self.start

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def itemsize(self) -> int:
        return DTYPE_SIZES[self.dtype_str]

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
        return self.dtype_str in FLOAT_NAMES
