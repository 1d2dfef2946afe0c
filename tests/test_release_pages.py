"""`release_file_pages`: a packed weight's memory-mapped source gives its pages back; anonymous memory is untouched."""

import mmap

import pytest
import torch

from phimm.formats.shards import release_file_pages


def _rss_kb(lo: int) -> int:
    """Resident kB of the mapping that starts at `lo` (from /proc/self/smaps)."""
    found = False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()[0]
            if "-" in head and all(c in "0123456789abcdef-" for c in head):
                found = int(head.split("-")[0], 16) == lo
            elif found and line.startswith("Rss:"):
                return int(line.split()[1])
    raise AssertionError("mapping not found")


@pytest.mark.skipif(not hasattr(mmap, "MAP_PRIVATE"), reason="POSIX mmap only")
def test_file_backed_pages_are_released_and_read_again(tmp_path):
    data = torch.arange(4 * mmap.PAGESIZE, dtype=torch.uint8)  # 4 pages of 0..255 repeating
    path = tmp_path / "w.bin"
    path.write_bytes(data.numpy().tobytes())
    with open(path, "r+b") as f:
        mm = mmap.mmap(f.fileno(), 0, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE)
    t = torch.frombuffer(mm, dtype=torch.uint8)
    assert int(t.sum()) == int(data.sum())  # every page read: resident
    lo = t.data_ptr()
    assert _rss_kb(lo) >= 4 * mmap.PAGESIZE // 1024
    assert release_file_pages(t) == 4 * mmap.PAGESIZE
    assert _rss_kb(lo) == 0
    assert torch.equal(t, data)  # read again from the file
    del t
    mm.close()


def test_anonymous_memory_is_left_alone():
    t = torch.full((1 << 20,), 7, dtype=torch.uint8)
    assert release_file_pages(t) == 0
    assert bool((t == 7).all())
