"""The reader and the page cache (io/pagecache.py): with drop-behind, what it read from the
disk leaves the cache and what was cached before stays; without it nothing is dropped; the
bytes are right either way; the policy that decides it, once per run; and rows used in place
from the page cache (Reader.map_rows)."""

from __future__ import annotations

import ctypes
import ctypes.util
import dataclasses
import mmap
import os
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from stream_tv.errors import CorruptCheckpointError
from stream_tv.io import pagecache
from stream_tv.io.index import read_header
from stream_tv.io.reader import Reader
from stream_tv.options import RunOptions

linux_only = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="mincore and posix_fadvise are Linux's"
)

ROWS, COLS = 4096, 1024  # 16 MiB of float32: more than SLACK's reach back from one read


def _resident(path: str) -> float:
    """Fraction of ``path``'s pages in the page cache (mincore on an untouched mapping)."""
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t] + [ctypes.c_int] * 3 + [ctypes.c_long]
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    size = os.path.getsize(path)
    fd = os.open(path, os.O_RDONLY)
    try:
        addr = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        assert addr not in (None, ctypes.c_void_p(-1).value)
        try:
            pages = -(-size // mmap.PAGESIZE)
            vec = (ctypes.c_ubyte * pages)()
            assert libc.mincore(addr, size, vec) == 0
            return sum(v & 1 for v in bytes(vec)) / pages
        finally:
            libc.munmap(addr, size)
    finally:
        os.close(fd)


def _warm(path: str) -> None:
    with open(path, "rb") as f:
        f.read()


def _cold(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    if _resident(path) > 0.05:
        pytest.skip("this file system keeps pages after POSIX_FADV_DONTNEED (tmpfs?)")


@pytest.fixture
def model(tmp_path):
    weights = torch.randn(ROWS, COLS)
    path = str(tmp_path / "m.safetensors")
    save_file({"w": weights}, path)
    return path, read_header(path)["w"], weights


def _read_in_chunks(reader: Reader, spec, weights, rows: int = 512) -> None:
    for start in range(0, ROWS, rows):  # as the engine reads: row chunks, in order
        assert torch.equal(
            reader.read_rows(spec, start, start + rows), weights[start : start + rows]
        )


@linux_only
def test_drop_behind_leaves_a_cold_file_uncached(model):
    path, spec, weights = model
    _cold(path)
    with Reader(drop_behind=True) as r:
        _read_in_chunks(r, spec, weights)
        during = _resident(path)
    assert during < 0.5  # dropped as it went: at most SLACK behind the last read, of 16 MiB
    assert _resident(path) < 0.01  # and the rest when the file was closed


@linux_only
def test_drop_behind_keeps_what_was_cached_before(model):
    path, spec, weights = model
    _warm(path)
    assert _resident(path) > 0.95
    with Reader(drop_behind=True) as r:
        _read_in_chunks(r, spec, weights)
    assert _resident(path) > 0.95


@linux_only
def test_drop_behind_drops_only_the_part_it_brought_in(model):
    path, spec, weights = model
    _cold(path)
    _warm(path)  # cached by "someone else", then the second half evicted
    half = os.path.getsize(path) // 2 // mmap.PAGESIZE * mmap.PAGESIZE
    fd = os.open(path, os.O_RDONLY)
    os.posix_fadvise(fd, half, 0, os.POSIX_FADV_DONTNEED)
    os.close(fd)
    assert 0.45 < _resident(path) < 0.55
    with Reader(drop_behind=True) as r:
        assert torch.equal(r.read(spec), weights)
    # the first half (less the header page) stays, the second half is gone
    assert 0.45 < _resident(path) < 0.55


@linux_only
def test_without_drop_behind_the_kernel_keeps_what_was_read(model):
    path, spec, weights = model
    _cold(path)
    with Reader() as r:
        _read_in_chunks(r, spec, weights)
    assert _resident(path) > 0.9


def test_drop_behind_without_mincore_drops_nothing(model, monkeypatch):
    path, spec, weights = model
    monkeypatch.setattr(pagecache, "_LIBC", None)  # as on a platform without mincore
    calls = []
    monkeypatch.setattr(pagecache.os, "posix_fadvise", lambda *a: calls.append(a), raising=False)
    with Reader(drop_behind=True) as r:
        _read_in_chunks(r, spec, weights)
    assert [c for c in calls if c[-1] == getattr(os, "POSIX_FADV_DONTNEED", None)] == []


def test_auto_drops_only_what_cannot_stay_cached(monkeypatch):
    monkeypatch.setattr(pagecache, "host_takes_free_pages", lambda: False)  # bare metal
    gib = 2**30
    assert not pagecache.drops_behind("auto", 12 * gib, available=23 * gib)
    assert pagecache.drops_behind("auto", 24 * gib, available=23 * gib)
    assert pagecache.drops_behind("drop", 1, available=23 * gib)
    assert not pagecache.drops_behind("keep", 100 * gib, available=gib)
    with pytest.raises(ValueError):
        pagecache.drops_behind("never", 1, available=1)


def test_auto_keeps_when_memory_cannot_be_read(monkeypatch):
    monkeypatch.setattr(pagecache, "available_memory", lambda: None)
    monkeypatch.setattr(pagecache, "host_takes_free_pages", lambda: False)
    assert not pagecache.drops_behind("auto", 2**60)


def _virtio(root, name: str, device: str, features: str) -> None:
    d = root / name
    d.mkdir(parents=True)
    (d / "device").write_text(device + "\n")
    (d / "features").write_text(features.ljust(128, "0") + "\n")


def test_auto_drops_where_the_host_takes_free_pages_back(tmp_path, monkeypatch):
    """A balloon that reports free pages (bit 5) makes auto drop whatever the sizes; the
    same bit on another virtio device, or a balloon without it, does not."""
    root = tmp_path / "devices"
    _virtio(root, "virtio0", "0x0001", "000001")  # a network card: bit 5 means else
    _virtio(root, "virtio1", "0x0005", "0110")  # balloon: stats, deflate on OOM
    assert not pagecache.host_takes_free_pages(str(root))
    _virtio(root, "virtio2", "0x0005", "01100101")  # ... and free page reporting
    assert pagecache.host_takes_free_pages(str(root))
    assert not pagecache.host_takes_free_pages(str(tmp_path / "absent"))
    (root / "virtio3").mkdir()  # a device whose files cannot be read
    assert pagecache.host_takes_free_pages(str(root))
    gib = 2**30
    monkeypatch.setattr(pagecache, "host_takes_free_pages", lambda: True)
    assert pagecache.drops_behind("auto", gib, available=23 * gib)
    assert not pagecache.drops_behind("keep", gib, available=23 * gib)


def test_page_cache_option_is_checked():
    assert RunOptions(page_cache="drop").page_cache == "drop"
    with pytest.raises(Exception, match="page_cache 'nocache' is not one of auto, keep, drop"):
        RunOptions(page_cache="nocache")


def test_cgroup_limits_are_read_on_the_whole_path(tmp_path):
    own = tmp_path / "cgroup"
    # v1 memory controller: the leaf has no limit (2**63 - 4096), its parent 2 GiB
    own.write_text("4:memory:/jobs/run1\n1:cpu:/\n")
    v1 = tmp_path / "memory" / "jobs"
    (v1 / "run1").mkdir(parents=True)
    (v1 / "run1" / "memory.limit_in_bytes").write_text("9223372036854771712\n")
    (v1 / "memory.limit_in_bytes").write_text(f"{2 * 2**30}\n")
    assert pagecache._cgroup_limit(str(tmp_path), str(own)) == 2 * 2**30
    # v2: "max" is no limit; the leaf's own limit counts
    own.write_text("0::/a/b\n")
    (tmp_path / "a" / "b").mkdir(parents=True)
    (tmp_path / "a" / "memory.max").write_text("max\n")
    (tmp_path / "a" / "b" / "memory.max").write_text("1073741824\n")
    assert pagecache._cgroup_limit(str(tmp_path), str(own)) == 2**30
    own.write_text("0::/\n")
    assert pagecache._cgroup_limit(str(tmp_path), str(own)) is None


# ---- rows used in place (Reader.map_rows) ----------------------------------------------


def _mappings_of(path: str) -> int:
    with open("/proc/self/maps") as f:
        return sum(line.rstrip().endswith(path) for line in f)


@pytest.fixture(params=["cachestat", "mincore"])
def residency(request, monkeypatch, model):
    """Each way the reader learns that a range is cached: cachestat(2), or mincore where
    the kernel lacks it."""
    monkeypatch.setattr(pagecache, "_cachestat_works", pagecache._cachestat_works)
    if request.param == "mincore":
        monkeypatch.setattr(pagecache, "_cachestat_works", False)
    else:
        fd = os.open(model[0], os.O_RDONLY)
        try:
            if pagecache._all_cached(fd, 0, mmap.PAGESIZE) is None:
                pytest.skip("this kernel has no cachestat(2)")
        finally:
            os.close(fd)
    return request.param


@linux_only
def test_cachestat_counts_the_cached_pages_of_a_range(model):
    path, _, _ = model
    fd = os.open(path, os.O_RDONLY)
    try:
        _warm(path)
        if pagecache._all_cached(fd, 0, os.path.getsize(path)) is None:
            pytest.skip("this kernel has no cachestat(2)")
        assert pagecache._all_cached(fd, 0, os.path.getsize(path)) is True
        half = os.path.getsize(path) // 2 // mmap.PAGESIZE * mmap.PAGESIZE
        os.fsync(fd)
        os.posix_fadvise(fd, half, 0, os.POSIX_FADV_DONTNEED)
        if _resident(path) > 0.95:
            pytest.skip("this file system keeps pages after POSIX_FADV_DONTNEED (tmpfs?)")
        assert pagecache._all_cached(fd, 0, half) is True
        assert pagecache._all_cached(fd, half - mmap.PAGESIZE, 2 * mmap.PAGESIZE) is False
    finally:
        os.close(fd)


@linux_only
def test_resident_rows_are_mapped_in_place_with_the_bytes_a_read_gives(model, residency):
    path, spec, weights = model
    _warm(path)
    with Reader() as r:
        for start, stop in [(0, 512), (100, 612), (ROWS - 300, ROWS)]:
            rows = r.map_rows(spec, start, stop)
            assert rows is not None and rows.shape == (stop - start, COLS)
            assert torch.equal(rows, weights[start:stop])
            assert torch.equal(rows, r.read_rows(spec, start, stop))


@linux_only
def test_rows_not_all_in_the_page_cache_are_read_not_mapped(model, residency):
    path, spec, weights = model
    _cold(path)
    _warm(path)
    half = os.path.getsize(path) // 2 // mmap.PAGESIZE * mmap.PAGESIZE
    fd = os.open(path, os.O_RDONLY)
    os.posix_fadvise(fd, half, 0, os.POSIX_FADV_DONTNEED)  # the second half evicted
    os.close(fd)
    with Reader() as r:
        assert r.map_rows(spec, 0, ROWS // 4) is not None
        assert r.map_rows(spec, ROWS // 4, ROWS) is None  # one page out is enough
        assert r.map_rows(spec, ROWS - 512, ROWS) is None
    _cold(path)
    with Reader() as r:
        assert r.map_rows(spec, 0, ROWS) is None


@linux_only
def test_a_write_to_mapped_rows_never_reaches_the_file(model):
    path, spec, weights = model
    _warm(path)
    before = open(path, "rb").read()
    with Reader() as r:
        rows = r.map_rows(spec, 0, 512)
        rows.add_(1.0)  # in place, as a compute may do with its chunk
        assert torch.equal(rows, weights[:512] + 1.0)
        assert torch.equal(r.read_rows(spec, 0, 512), weights[:512])
    assert open(path, "rb").read() == before


@linux_only
def test_a_mapping_ends_with_the_last_view_of_it(model):
    path, spec, _ = model
    _warm(path)
    with Reader() as r:
        rows = r.map_rows(spec, 0, 512)
        half = rows[256:]
        assert _mappings_of(path) == 1
        del rows
        assert _mappings_of(path) == 1  # a view still holds it
        del half
        assert _mappings_of(path) == 0


def test_small_or_unaligned_ranges_are_read_not_mapped(tmp_path):
    path = str(tmp_path / "m.safetensors")
    save_file({"a": torch.zeros(3, dtype=torch.uint8), "w": torch.randn(1024, 512)}, path)
    specs = read_header(path)
    with Reader() as r:
        assert r.map_rows(specs["w"], 0, 2) is None  # 4 KiB: below MIN_MAP_BYTES
    # a float32 tensor at an odd offset cannot be viewed in place
    w = specs["w"]
    odd = dataclasses.replace(w, start=w.start + 1, end=w.end + 1)
    with Reader() as r:
        assert r.map_rows(odd, 0, 1024) is None


@linux_only
def test_rows_past_the_end_of_a_file_truncated_during_the_run_are_refused(model):
    path, spec, _ = model
    _warm(path)
    with Reader() as r:
        assert r.map_rows(spec, 0, 512) is not None  # open, checked against its index
        os.truncate(path, os.path.getsize(path) // 2)
        with pytest.raises(CorruptCheckpointError, match="truncated after it was indexed"):
            r.map_rows(spec, ROWS - 512, ROWS)


@linux_only
def test_resident_pages_are_the_same_counted_by_blocks_or_page_by_page(model, monkeypatch):
    path, _, _ = model
    _cold(path)
    _warm(path)
    cut = (os.path.getsize(path) // 2 // mmap.PAGESIZE + 5) * mmap.PAGESIZE  # inside a block
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, cut, 0, os.POSIX_FADV_DONTNEED)
        if pagecache._cached_pages(fd, 0, mmap.PAGESIZE) is None:
            pytest.skip("this kernel has no cachestat(2)")
        by_blocks = pagecache.resident_pages(fd, os.path.getsize(path))
        monkeypatch.setattr(pagecache, "_cachestat_works", False)
        by_pages = pagecache.resident_pages(fd, os.path.getsize(path))
    finally:
        os.close(fd)
    assert np.array_equal(by_blocks, by_pages)
    first = cut // mmap.PAGESIZE
    assert by_blocks[: first - 512].all()  # the folio around the cut may stay or go
    assert not by_blocks[first + 512 :].any()


@linux_only
def test_with_drop_behind_only_rows_cached_at_open_are_mapped(model):
    path, spec, weights = model
    _cold(path)
    with Reader(drop_behind=True) as r:
        assert torch.equal(r.read_rows(spec, 0, 1), weights[:1])  # opened: nothing cached
        _warm(path)  # cached since (as the kernel's readahead would): ours to drop, not map
        assert r.map_rows(spec, 0, 512) is None
    _warm(path)  # (closing dropped what that reader brought in)
    with Reader(drop_behind=True) as r:  # cached at open: the user's pages, used in place
        rows = r.map_rows(spec, 0, 512)
        assert rows is not None and torch.equal(rows, weights[:512])
