"""PEFT LoRA adapters: on disk, bound to a base, planned, and opened to stream rows.

- :mod:`.adapter`: an adapter on disk (config + weights header): :class:`Adapter`;
- :mod:`.bind`: adapter + base headers -> :class:`MergePlan`, checked before any data, from
  the model definition (:mod:`.bind_facts` over :mod:`.model_facts`) or, without one, from
  names and shapes (:mod:`.bind_rules`);
- :mod:`.plan`: the immutable plan: per base tensor a :class:`TensorMerge` of steps;
- :mod:`.runtime`: ``TensorMerge.open(device)``: loaded factors, DoRA state, row maths;
- :mod:`.delta`, :mod:`.keys`, :mod:`.config`: per-layer maths, key mapping, config rules;
- the other direction (``extract-lora``): :mod:`.extract_targets` (which tensor of a fine-tune
  an adapter holds, and how, from the model definition) and :mod:`.adapter_out` (an adapter
  directory written in bounded memory).

Example (not run here)::

    from stream_tv.lora import Adapter
    plan = Adapter.load("my-adapter").bind(open_checkpoint("my-base"))
"""

from .adapter import ADAPTER_PATTERNS, Adapter, LoraModule, SavedTensor
from .config import AdapterConfig, load_config, parse_config
from .plan import PRECISIONS, MergePlan, Step, TensorMerge
from .runtime import OpenMerge

__all__ = [
    "ADAPTER_PATTERNS",
    "PRECISIONS",
    "Adapter",
    "AdapterConfig",
    "LoraModule",
    "MergePlan",
    "OpenMerge",
    "SavedTensor",
    "Step",
    "TensorMerge",
    "load_config",
    "parse_config",
]
