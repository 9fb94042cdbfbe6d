"""stream_tv: task vectors, LoRA merges and comparisons on checkpoints larger than RAM.

The public API, one function per command; each takes ``options=RunOptions(...)`` for the
options every streaming command shares::

    import stream_tv
    opts = stream_tv.RunOptions(device="cpu", chunk_size="64MB", progress=False)
    tv = stream_tv.extract_task_vector("base/", "finetuned/", "tv/", options=opts)
    lora = stream_tv.extract_lora("base/", "finetuned/", "adapter/", rank=16, options=opts)
    stream_tv.merge_lora("base/", "lora/", "merged/", options=opts)
    report = stream_tv.compare(base="base/", finetuned="merged/", adapter="lora/")

Names are imported on first use, so ``import stream_tv`` (and the CLI's ``--help``) does
not pay for torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# public name -> module that defines it
_EXPORTS = {
    "RunOptions": "options",
    "StreamTVError": "errors",
    "InspectResult": "commands.inspect",
    "inspect": "commands.inspect",
    "ExtractResult": "commands.extract",
    "extract_task_vector": "commands.extract",
    "ApplyResult": "commands.apply",
    "apply_task_vectors": "commands.apply",
    "MergeResult": "commands.merge",
    "LoraDeltaResult": "commands.merge",
    "merge_lora": "commands.merge",
    "lora_delta": "commands.merge",
    "compare": "commands.compare",
    "CompareReport": "report",
    "VerifyResult": "commands.verify",
    "verify_output": "commands.verify",
    "WriteResult": "jobs",
    "ExtractLoraResult": "commands.extract_lora",
    "extract_lora": "commands.extract_lora",
}

__all__ = [
    "ApplyResult",
    "CompareReport",
    "ExtractLoraResult",
    "ExtractResult",
    "InspectResult",
    "LoraDeltaResult",
    "MergeResult",
    "RunOptions",
    "StreamTVError",
    "VerifyResult",
    "WriteResult",
    "__version__",
    "apply_task_vectors",
    "compare",
    "extract_lora",
    "extract_task_vector",
    "inspect",
    "lora",
    "lora_delta",
    "merge_lora",
    "verify_output",
]


def __getattr__(name: str) -> Any:
    if name == "lora":
        return importlib.import_module(".lora", __name__)
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'stream_tv' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # once imported, a plain attribute
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


if TYPE_CHECKING:  # for type checkers and IDEs: the same names, imported eagerly
    from . import lora
    from .commands.apply import ApplyResult, apply_task_vectors
    from .commands.compare import compare
    from .commands.extract import ExtractResult, extract_task_vector
    from .commands.extract_lora import ExtractLoraResult, extract_lora
    from .commands.inspect import InspectResult, inspect
    from .commands.merge import LoraDeltaResult, MergeResult, lora_delta, merge_lora
    from .commands.verify import VerifyResult, verify_output
    from .errors import StreamTVError
    from .jobs import WriteResult
    from .options import RunOptions
    from .report import CompareReport
