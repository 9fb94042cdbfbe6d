"""stream_tv.jsonutil: what strict JSON can hold, for every kind of value results carry."""

from __future__ import annotations

import enum
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from stream_tv.jsonutil import json_safe


class Color(enum.Enum):
    RED = "red"


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (math.nan, None),
        (math.inf, None),
        (-math.inf, None),
        (-0.0, -0.0),
        (1.5, 1.5),
        (7, 7),
        (True, True),
        (None, None),
        ("x", "x"),
        (Path("/models/m"), "/models/m"),
        (torch.bfloat16, "bfloat16"),
        (torch.device("cpu"), "cpu"),
        (Color.RED, "red"),
        (np.float64(np.nan), None),
        (np.float32(0.5), 0.5),
        (np.int64(3), 3),
        (np.bool_(True), True),
        ((1, (2, 3)), [1, [2, 3]]),
        ({3, 1, 2}, [1, 2, 3]),
        ({1: {"a": (math.inf,)}}, {"1": {"a": [None]}}),
    ],
)
def test_json_safe(value, expected):
    got = json_safe(value)
    assert got == expected and type(got) is type(expected)
    json.dumps(got, allow_nan=False)  # strict JSON: raises on NaN / Infinity


def test_json_safe_does_not_mutate():
    data = {"t": (1.0, math.nan), "d": {"x": [math.inf]}}
    json_safe(data)
    assert data["t"][0] == 1.0 and math.isnan(data["t"][1]) and data["d"]["x"] == [math.inf]
