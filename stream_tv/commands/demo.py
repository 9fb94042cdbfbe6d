"""The newcomer's example: make a small base model and LoRA adapter, then run the main job.

``stream-tv demo DIR`` writes a Llama-shaped bf16 base (several shards) and a PEFT LoRA
adapter on the attention projections, merges the adapter (PEFT-exact), extracts the task
vector of the merged model, and compares the adapter's delta with it.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import OutputError
from ..options import RunOptions
from ..report import CompareReport
from ..synthetic import llama_config, write_adapter, write_base
from .compare import compare
from .extract import ExtractResult, extract_task_vector
from .merge import MergeResult, merge_lora


@dataclass
class DemoResult:
    directory: Path
    merge: MergeResult
    extract: ExtractResult
    report: CompareReport


#: What the demo writes in its directory; ``--overwrite`` removes these and nothing else.
DEMO_ENTRIES = (
    "base",
    "adapter",
    "merged",
    "task-vector",
    "report.json",
    "report.md",
    "report.png",
)
MARKER = ".stream-tv-demo"


def run_demo(
    directory: str | os.PathLike, *, overwrite: bool = False, options: RunOptions | None = None
) -> DemoResult:
    """Build the example in ``directory`` and run merge, extract and compare on it.

    ``overwrite`` replaces an earlier demo in ``directory`` (the entries it made, which its
    marker file records); anything else there is left alone.
    """
    root = Path(directory)
    _prepare(root, overwrite)
    options = options or RunOptions()
    config = llama_config(hidden=256, intermediate=704, layers=4, vocab=4096, dtype=torch.bfloat16)
    write_base(root / "base", config, seed=0, max_shard_size=3_000_000)
    write_adapter(root / "adapter", config, rank=8, alpha=16, base_name=str(root / "base"))
    merged = merge_lora(root / "base", root / "adapter", root / "merged", options=options)
    tv = extract_task_vector(root / "base", root / "merged", root / "task-vector", options=options)
    report = compare(
        base=root / "base",
        finetuned=root / "merged",
        adapter=root / "adapter",
        json_path=root / "report.json",
        markdown_path=root / "report.md",
        plot_path=root / "report.png" if _has_matplotlib() else None,
        options=options,
    )
    return DemoResult(root, merged, tv, report)


def _prepare(root: Path, overwrite: bool) -> None:
    present = [n for n in DEMO_ENTRIES if (root / n).exists() or (root / n).is_symlink()]
    if root.exists() and any(root.iterdir()):
        if not overwrite:
            raise OutputError(
                "directory is not empty", where=str(root), hint="pass --overwrite or another path"
            )
        if present and not (root / MARKER).is_file():
            raise OutputError(
                f"the directory holds {present[0]!r}, which no earlier demo made here",
                where=str(root),
                hint="choose another directory: --overwrite replaces only a demo's own files",
            )
        for name in present:
            p = root / name
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            else:
                p.unlink()
    root.mkdir(parents=True, exist_ok=True)
    (root / MARKER).write_text("made by `stream-tv demo`: " + ", ".join(DEMO_ENTRIES) + "\n")


def _has_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True
