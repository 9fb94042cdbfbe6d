"""PEFT LoRA adapters: config, key mapping, per-layer maths, and merge plans.

Example (not run here)::

    from stream_tv.lora import Adapter
    plan = Adapter.load("my-adapter").bind(open_checkpoint("my-base"))
"""

from .adapter import (
    ADAPTER_PATTERNS,
    PRECISIONS,
    Adapter,
    LoraModule,
    MergePlan,
    SavedTensor,
    Step,
    TensorMerge,
)
from .config import AdapterConfig, load_config, parse_config

__all__ = [
    "ADAPTER_PATTERNS",
    "PRECISIONS",
    "Adapter",
    "AdapterConfig",
    "LoraModule",
    "MergePlan",
    "SavedTensor",
    "Step",
    "TensorMerge",
    "load_config",
    "parse_config",
]
