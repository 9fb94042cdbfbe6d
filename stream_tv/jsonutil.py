"""One JSON sanitiser for the project: any result value -> what strict JSON can hold.

Every report and result that stream_tv writes as JSON goes through :func:`json_safe` and then
``json.dumps(..., allow_nan=False)``: JSON has no NaN or Infinity, no tuples, no paths.

>>> import math, pathlib, torch
>>> json_safe({"x": math.nan, "p": pathlib.Path("/m"), "d": torch.bfloat16, "t": (1, 2.5)})
{'x': None, 'p': '/m', 'd': 'bfloat16', 't': [1, 2.5]}
"""

from __future__ import annotations

import math
import numbers
import os
from enum import Enum
from typing import Any

__all__ = ["json_safe"]


def json_safe(value: Any) -> Any:
    """``value`` with only JSON types left: dict (str keys), list, str, int, float, bool, None.

    - non-finite floats (NaN, +-inf) become ``None`` (JSON null);
    - tuples, lists, sets and frozensets become lists (sets sorted, so the text is stable);
    - paths become their ``str``; enums their value, sanitised;
    - numpy / torch scalars become Python ``int``, ``float`` or ``bool``;
    - anything else (``torch.dtype``, ``torch.device``, ...) becomes its ``str``, without a
      leading ``torch.`` (``torch.bfloat16`` -> ``"bfloat16"``).

    Dict keys become strings. Nothing is mutated; a new structure is returned.

    >>> json_safe([math.inf, -0.0, {1: {2, 1}}, True])
    [None, -0.0, {'1': [1, 2]}, True]
    """
    if value is None or isinstance(value, (str, bool)):
        return value
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, (set, frozenset)):
        return [json_safe(v) for v in sorted(value, key=repr)]
    if isinstance(value, Enum):
        return json_safe(value.value)
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    # subtle: numpy.bool_ is neither bool nor numbers.Integral; ask it for its Python value.
    if type(value).__name__ in ("bool_", "bool") and hasattr(value, "item"):
        return bool(value.item())
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        x = float(value)
        return x if math.isfinite(x) else None
    return str(value).removeprefix("torch.")
