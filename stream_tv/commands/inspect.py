"""``inspect``: tensors, dtypes, shapes, sizes and shards of a checkpoint, from headers only."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ..io.index import TensorSpec
from ..refs import open_headers


@dataclass
class InspectResult:
    reference: str
    files: list[Path]
    tensors: list[TensorSpec]
    total_bytes: int
    total_params: int
    metadata: dict

    def to_dict(self) -> dict:
        return {
            "reference": self.reference,
            "files": [str(f) for f in self.files],
            "total_bytes": self.total_bytes,
            "total_params": self.total_params,
            "dtypes": _count_dtypes(self.tensors),
            "tensors": [
                {
                    "name": s.name,
                    "dtype": s.dtype_str,
                    "shape": list(s.shape),
                    "bytes": s.nbytes,
                    "file": s.file.name,
                }
                for s in self.tensors
            ],
            "metadata": self.metadata,
        }


def _count_dtypes(specs: Sequence[TensorSpec]) -> dict[str, dict[str, int]]:
    out: dict[str, dict[str, int]] = {}
    for s in specs:
        d = out.setdefault(s.dtype_str, {"tensors": 0, "params": 0, "bytes": 0})
        d["tensors"] += 1
        d["params"] += s.numel
        d["bytes"] += s.nbytes
    return out


def inspect(reference: str | os.PathLike) -> InspectResult:
    """Tensors, dtypes, shapes, sizes and shards of a checkpoint, from headers only (a Hub
    model's headers are read in place: no weight is downloaded)."""
    ckpt = open_headers(reference)
    return InspectResult(
        ckpt.reference,
        ckpt.files,
        list(ckpt.tensors.values()),
        ckpt.total_bytes,
        ckpt.total_params,
        dict(ckpt.metadata),
    )
