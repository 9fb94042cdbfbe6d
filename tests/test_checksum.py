"""The fast CRC-32 (libdeflate, where the system has it) is zlib's, value for value."""

import threading
import zlib

import pytest
import torch

from stream_tv.engine import bytes_of
from stream_tv.io import checksum


@pytest.mark.parametrize("n", [0, 1, 1000, 65535, 65536, 65537, 3 << 20])
def test_crc32_is_zlibs(n):
    data = bytes_of(torch.randint(0, 256, (n,), dtype=torch.uint8))
    assert checksum.crc32(data) == zlib.crc32(data)
    assert checksum.crc32(data, 0x12345678) == zlib.crc32(data, 0x12345678)
    half = n // 2
    chained = checksum.crc32(data[half:], checksum.crc32(data[:half]))
    assert chained == zlib.crc32(data)


def test_crc32_of_bytes_and_readonly_buffers():
    blob = bytes(range(256)) * 1000
    assert checksum.crc32(blob) == zlib.crc32(blob)
    assert checksum.crc32(memoryview(blob)[3:]) == zlib.crc32(blob[3:])


@pytest.mark.parametrize("n", [65536, 65537, 1 << 20, (3 << 20) + 7])
def test_without_libdeflate_a_crc_split_across_threads_is_zlibs(monkeypatch, n):
    """Where libdeflate is missing, large CRCs run in several threads, joined with zlib's
    crc32_combine: the same values, and no thread left running."""
    combine = checksum._load_combine()
    assert combine is not None  # zlib's crc32_combine, checked on a test vector
    monkeypatch.setattr(checksum, "_LIBDEFLATE", None)
    monkeypatch.setattr(checksum, "_COMBINE", combine)
    monkeypatch.setattr(checksum, "THREADS", 3)
    monkeypatch.setattr(checksum, "_PIECE", 1000)  # split even these
    data = bytes_of(torch.randint(0, 256, (n,), dtype=torch.uint8))
    before = threading.active_count()
    assert checksum.crc32(data) == zlib.crc32(data)
    assert checksum.crc32(data, 0x9ABCDEF0) == zlib.crc32(data, 0x9ABCDEF0)
    half = n // 2
    assert checksum.crc32(data[half:], checksum.crc32(data[:half])) == zlib.crc32(data)
    assert threading.active_count() == before
