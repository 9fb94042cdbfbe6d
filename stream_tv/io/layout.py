"""The structure of a written output, from its index and shard headers only (for verify).

:func:`read_layout` checks, without reading tensor data: the index parses; every shard it
names exists, with a valid header holding every tensor the ``weight_map`` puts there and no
other; ``total_size`` matches; no journal or temporary file of an unfinished run is left;
every shard has a recorded checksum. What is wrong goes to a list of problems, so that
``verify`` reports everything it finds at once.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..errors import CorruptCheckpointError, ReferenceNotFoundError, StreamTVError
from .index import INDEX_NAME, MAX_INDEX_BYTES, TensorSpec, read_header, read_json
from .outdir import CHECKSUMS_KEY, STATE_DIR, STATE_FILE, is_temporary

SHARD_GLOB = "model-*-of-*.safetensors"


@dataclass
class Layout:
    root: Path
    files: dict[Path, dict[str, TensorSpec]]  # readable shard -> its header, data order
    header_bytes: dict[Path, int]  # shard -> bytes before its data (header incl. length)
    metadata: dict[str, object]
    checksums: dict[Path, str]  # shard -> "crc32:xxxxxxxx", as recorded
    complete: bool  # an index (or a single file) was found, so the output is finished


def read_layout(out: Path, problems: list[str]) -> Layout:
    """The output's index and shard headers; what is wrong with them goes to ``problems``."""
    if out.is_file():
        layout = Layout(out.parent, {}, {}, {}, {}, complete=True)
        _add_file(layout, out, problems)
        return layout
    layout = Layout(out, {}, {}, {}, {}, complete=False)
    if (out / STATE_DIR / STATE_FILE).exists():
        problems.append(
            f"{STATE_DIR}/{STATE_FILE} is present: the run writing this directory did not "
            "finish (rerun the same command to resume it)"
        )
    leftovers = sorted(p.name for p in out.iterdir() if is_temporary(p.name))
    if leftovers:
        problems.append(f"temporary file(s) of an unfinished run: {', '.join(leftovers[:3])}")
    index = out / INDEX_NAME
    if not index.is_file():
        singles = sorted(p for p in out.glob("*.safetensors") if not p.name.startswith("."))
        if len(singles) == 1 and not (out / STATE_DIR / STATE_FILE).exists():
            layout.complete = True
            _add_file(layout, singles[0], problems)
        else:
            problems.append(f"no {INDEX_NAME}: not a finished output (the index is written last)")
        return layout
    try:
        data, _ = read_json(index, what=INDEX_NAME, limit=MAX_INDEX_BYTES)
    except StreamTVError as e:
        problems.append(e.message)
        return layout
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        problems.append(f"{INDEX_NAME} has no weight_map of tensor name -> file")
        return layout
    layout.complete = True
    meta = data.get("metadata")
    layout.metadata = dict(meta) if isinstance(meta, dict) else {}
    by_file: dict[str, set[str]] = {}
    for name, fname in weight_map.items():
        by_file.setdefault(fname, set()).add(name)
    _read_shards(layout, by_file, problems)
    return layout


def _read_shards(layout: Layout, by_file: dict[str, set[str]], problems: list[str]) -> None:
    """The shards an index names: present, headers matching it, sizes, checksums."""
    out = layout.root
    listed_bytes = 0
    for fname in sorted(by_file):
        if Path(fname).is_absolute() or ".." in Path(fname).parts or "\0" in fname:
            problems.append(f"the index names a file outside the directory: {fname!r}")
            continue
        path = out / fname
        try:
            exists = path.is_file()
        except OSError as e:  # e.g. a name too long for the file system
            problems.append(f"the index names an unusable file {fname[:80]!r}: {e.strerror}")
            continue
        if not exists:
            problems.append(f"shard {fname} is missing ({len(by_file[fname])} tensor(s) in it)")
            continue
        if not _add_file(layout, path, problems):
            continue
        specs = layout.files[path]
        missing = sorted(by_file[fname] - specs.keys())
        if missing:
            problems.append(
                f"{fname}: {len(missing)} tensor(s) of the index are not in its header "
                f"(e.g. {', '.join(missing[:3])})"
            )
        extra = sorted(specs.keys() - by_file[fname])
        if extra:
            problems.append(
                f"{fname}: {len(extra)} tensor(s) the index does not list "
                f"(e.g. {', '.join(extra[:3])})"
            )
        listed_bytes += sum(s.nbytes for n, s in specs.items() if n in by_file[fname])
    total = layout.metadata.get("total_size")
    if total is not None and len(layout.files) == len(by_file):
        if not isinstance(total, int) or isinstance(total, bool) or total != listed_bytes:
            problems.append(
                f"index metadata.total_size is {total!r}, the shards hold {listed_bytes} bytes"
            )
    stray = sorted(p.name for p in out.glob(SHARD_GLOB) if p.name not in by_file)
    if stray:
        problems.append(f"shard file(s) the index does not name: {', '.join(stray[:3])}")
    recorded = layout.metadata.get(CHECKSUMS_KEY)
    if recorded is not None:
        if not isinstance(recorded, dict):
            problems.append(f"index metadata.{CHECKSUMS_KEY} is not a JSON object")
        else:
            for fname in sorted(by_file):
                value = recorded.get(fname)
                if not (isinstance(value, str) and parse_crc(value) is not None):
                    problems.append(f"{fname}: no valid recorded checksum (found {value!r})")
                elif (out / fname) in layout.files:
                    layout.checksums[out / fname] = value


def _add_file(layout: Layout, path: Path, problems: list[str]) -> bool:
    try:
        specs = read_header(path)
    except (CorruptCheckpointError, ReferenceNotFoundError) as e:
        problems.append(f"{path.name}: {e.message}")
        return False
    layout.files[path] = specs
    starts = [s.start for s in specs.values()]
    layout.header_bytes[path] = min(starts) if starts else path.stat().st_size
    return True


def parse_crc(text: str) -> int | None:
    kind, _, digits = text.partition(":")
    if kind != "crc32" or len(digits) != 8:
        return None
    try:
        return int(digits, 16)
    except ValueError:
        return None
