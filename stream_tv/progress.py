"""The progress bar of a run: bytes read, and tensors finished (one process or several)."""

from __future__ import annotations

from typing import Any

__all__ = ["progress_bar"]


def progress_bar(enabled: bool, total: int, tensors: int, description: str) -> Any:
    """A tqdm bar over ``total`` input bytes (None when not ``enabled``)."""
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(
        total=total,
        unit="B",
        unit_scale=True,
        unit_divisor=1000,
        desc=description,
        dynamic_ncols=True,
        leave=False,
        mininterval=0.25,
        postfix=f"0/{tensors} tensors",
    )
