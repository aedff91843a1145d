"""hetero.memory: a large host buffer starts on a 2 MiB boundary and is advised for huge pages to its end."""
import sys

import pytest
import torch

from hetero import memory

HUGE = 2 << 20
linux = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="huge-page advice is Linux only")


def _record_advice(monkeypatch):
    advised = []
    monkeypatch.setattr(memory, "_madvise_hugepages", lambda address, length: advised.append((address, length)) or True)
    return advised


@linux
@pytest.mark.parametrize("shape,dtype", [((1, 8, 4100, 128), torch.bfloat16), ((3, 1 << 20), torch.float32),
                                         ((4 * HUGE + 1,), torch.uint8), (4 * HUGE, torch.uint8)])
def test_a_large_buffer_starts_on_a_huge_page_and_its_advice_covers_it(monkeypatch, shape, dtype):
    """A fast-tier window of 8 MiB from the allocator began 1 MiB into a huge page: its head and tail, a quarter of
    it, stayed in 4 KiB pages."""
    monkeypatch.delenv("HETERO_HUGEPAGES", raising=False)
    advised = _record_advice(monkeypatch)
    t = memory.empty_host(shape, dtype)
    want = (shape,) if isinstance(shape, int) else shape
    assert tuple(t.shape) == want and t.dtype == dtype and t.is_contiguous()
    nbytes = t.numel() * t.element_size()
    assert t.data_ptr() % HUGE == 0
    (address, length), = advised
    assert address == t.data_ptr() and length % HUGE == 0 and nbytes <= length < nbytes + HUGE
    t.view(-1)[0], t.view(-1)[-1] = 3, 5  # its first and last elements are its own
    assert t.view(-1)[0] == 3 and t.view(-1)[-1] == 5


@pytest.mark.parametrize("env,nbytes", [("0", 16 << 20), (None, 4 * HUGE - 1)])
def test_small_buffers_and_turned_off_advice_are_plain_allocations(monkeypatch, env, nbytes):
    if env is None:
        monkeypatch.delenv("HETERO_HUGEPAGES", raising=False)
    else:
        monkeypatch.setenv("HETERO_HUGEPAGES", env)
    advised = _record_advice(monkeypatch)
    t = memory.empty_host((nbytes,), torch.uint8)
    assert advised == [] and t.numel() == nbytes
    assert t.untyped_storage().nbytes() == nbytes  # no slack around it


def test_zeros_host_is_zero():
    t = memory.zeros_host((3, HUGE + 7), torch.float32)
    assert t.shape == (3, HUGE + 7) and not t.any()
