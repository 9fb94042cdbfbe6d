"""stream_tv: task vectors, LoRA merges and comparisons on checkpoints larger than RAM."""

__version__ = "0.1.0"

from . import lora  # noqa: E402
from .api import (  # noqa: E402
    ApplyResult,
    ExtractResult,
    InspectResult,
    RunOptions,
    WriteResult,
    apply_task_vectors,
    extract_task_vector,
    inspect,
)
from .compare import compare  # noqa: E402
from .errors import StreamTVError  # noqa: E402
from .merge import LoraDeltaResult, MergeResult, lora_delta, merge_lora  # noqa: E402
from .report import CompareReport  # noqa: E402
from .verify import verify_output  # noqa: E402

__all__ = [
    "ApplyResult",
    "CompareReport",
    "ExtractResult",
    "InspectResult",
    "LoraDeltaResult",
    "MergeResult",
    "RunOptions",
    "StreamTVError",
    "WriteResult",
    "__version__",
    "apply_task_vectors",
    "compare",
    "extract_task_vector",
    "inspect",
    "lora",
    "lora_delta",
    "merge_lora",
    "verify_output",
]
