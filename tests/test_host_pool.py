"""The host tier's pool in memory: room reserved as address space (no memory until written, no copy while a model
decodes), and the next rows backed by memory on a background thread ahead of the appends that write them."""
import ctypes
import mmap
import sys
from concurrent.futures import Future

import numpy as np
import pytest
import torch

from hetero import memory, tiers
from hetero.tiers import HostTier

linux = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="mincore and the advice are Linux only")
PAGE = 4096


def resident_bytes(address: int, length: int) -> int:
    """Bytes of ``[address, address + length)`` backed by memory now (``mincore``, page by page)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    start = address - address % PAGE
    pages = -(-(address + length - start) // PAGE)
    vec = (ctypes.c_ubyte * pages)()
    assert libc.mincore(start, pages * PAGE, vec) == 0, ctypes.get_errno()
    return int(np.frombuffer(vec, dtype=np.uint8).astype(bool).sum()) * PAGE


def _tier(heads=2, d=16, dtype=torch.float32, block_tokens=16, batch=1):
    return HostTier(batch, heads, d, dtype, block_tokens)


def _fill(tier, seq, n, gen):
    k = torch.randn(tier.kv_heads, n, tier.head_dim, generator=gen).to(tier.dtype)
    v = torch.randn(tier.kv_heads, n, tier.head_dim, generator=gen).to(tier.dtype)
    tier.append(seq, k, v)
    return k, v


class InlineWorker:
    """Runs each submitted call at once and records it."""

    def __init__(self):
        self.calls = []

    def try_submit(self, fn, *args, idle_only=False):
        self.calls.append(args)
        fut = Future()
        fut.set_result(fn(*args))
        return fut


@linux
def test_populate_backs_a_range_and_keeps_its_contents():
    mapping = mmap.mmap(-1, 64 << 20)  # fresh pages from the system (an allocator may hand out used ones)
    buf = torch.frombuffer(mapping, dtype=torch.uint8)
    memory._madvise(buf.data_ptr(), buf.numel(), 15)  # MADV_NOHUGEPAGE: 4 KiB pages even where THP is "always"
    window = buf[16 << 20: 20 << 20]
    buf[(16 << 20) + 5] = 7  # backs the window's first page only
    assert resident_bytes(window.data_ptr(), window.numel()) == PAGE
    if not memory.populate(window.data_ptr() + 100, window.numel() - 200):  # unaligned ends: whole pages around them
        pytest.skip("this kernel has no MADV_POPULATE_WRITE (Linux 5.14+)")
    assert resident_bytes(window.data_ptr(), window.numel()) == window.numel()
    assert resident_bytes(buf.data_ptr(), buf.numel()) == window.numel()  # nothing outside it
    assert int(buf[(16 << 20) + 5]) == 7 and int(window.sum()) == 7  # contents kept: the rest still zeros
    del window, buf


@linux
def test_a_pool_reserves_room_as_address_space_not_memory():
    """The room for a million tokens is reserved, and only the rows written are backed: 200 tokens of 2 KV heads
    take at most a huge page (or two) of each head's region, not the room's 256 MiB."""
    tier = _tier()
    gen = torch.Generator().manual_seed(0)
    k, v = _fill(tier, 0, 200, gen)
    pool = tier.kv_pool
    assert pool.shape[1] >= tiers.RESERVE_TOKENS
    span = pool.numel() * pool.element_size()
    assert resident_bytes(pool.data_ptr(), span) <= tier.kv_heads * 2 * memory.HUGE_PAGE_BYTES
    assert torch.equal(tier.keys(0), k) and torch.equal(tier.values(0), v)


def test_growth_copies_only_the_rows_handed_out_and_refused_room_falls_back(monkeypatch):
    """Past its room the pool grows by copying the blocks handed out (not the room after them, whose copy would back
    it with memory); where the system refuses the address space, it takes a 1.5x pool instead."""
    monkeypatch.setattr(tiers, "RESERVE_TOKENS", 64)
    tier = _tier()
    gen = torch.Generator().manual_seed(1)
    k, v = _fill(tier, 0, 40, gen)  # 3 blocks: room for 4 x 3 blocks
    assert tier.kv_pool.shape[1] == 4 * 3 * 16
    real_alloc, sizes = tier._alloc, []

    def refuse_large(blocks):
        sizes.append(blocks)
        if blocks > 20:
            raise RuntimeError("DefaultCPUAllocator: can't allocate memory")
        return real_alloc(blocks)

    monkeypatch.setattr(tier, "_alloc", refuse_large)
    k2, v2 = _fill(tier, 0, 160, gen)  # 13 blocks: room for 52 refused, then 1.5 x 12 = 18
    assert sizes == [52, 18] and tier.kv_pool.shape[1] == 18 * 16
    assert torch.equal(tier.keys(0), torch.cat([k, k2], 1)) and torch.equal(tier.values(0), torch.cat([v, v2], 1))


def test_a_view_ends_at_the_rows_handed_out():
    tier = _tier()
    _fill(tier, 0, 40, torch.Generator().manual_seed(2))
    view = tier.view()
    assert view.k_pool.shape[1] == view.v_pool.shape[1] == tier.rows_reserved == 48
    assert view.k_pool.data_ptr() == tier.k_pool.data_ptr() and view.k_pool.stride() == tier.k_pool.stride()


def test_populate_ahead_asks_once_the_appends_come_near_one_page_at_a_time():
    tier = _tier(heads=3, d=64, dtype=torch.bfloat16, block_tokens=256)  # rows of 256 B: 8192 rows a 2 MiB
    page = tier._page_rows
    assert page == 8192
    gen = torch.Generator().manual_seed(3)
    _fill(tier, 0, 1000, gen)
    worker, lead = InlineWorker(), tier.populate_lead(0)
    assert lead == page // 2
    assert tier.populate_ahead(lead, worker)  # 1024 rows handed out + 4096 >= 1024: the next page, asked at once
    (pool_ref, addresses, length), = worker.calls
    assert pool_ref() is tier.kv_pool and length == page * 256
    head_bytes = tier.kv_pool.stride(0) * 2
    assert addresses == [tier.kv_pool[0, 1024].data_ptr() + h * head_bytes for h in range(3)]
    assert not tier.populate_ahead(lead, worker)  # backed up to 1024 + 8192: not near yet
    _fill(tier, 0, 9216 - 1000 - lead, gen)  # 9216 - 4096 = 5120 tokens: the handed-out rows reach 5120
    assert tier.rows_reserved + lead >= 1024 + page and tier.populate_ahead(lead, worker)
    assert worker.calls[-1][1][0] == tier.kv_pool[0, 1024 + page].data_ptr()
    assert len(worker.calls) == 2


def test_populate_ahead_waits_for_the_one_in_flight_and_skips_pinned_or_workerless_tiers():
    tier = _tier(block_tokens=64)
    _fill(tier, 0, 10, torch.Generator().manual_seed(4))
    pending = Future()

    class Slow:
        calls = 0

        def try_submit(self, fn, *args, idle_only=False):
            Slow.calls += 1
            return pending

    class Full:
        def try_submit(self, fn, *args, idle_only=False):
            return None

    lead = 10 * tier._page_rows
    assert not tier.populate_ahead(lead, Full())  # a full queue: not waited for, and asked again next time
    assert tier.populate_ahead(lead, Slow()) and not tier.populate_ahead(lead, Slow()) and Slow.calls == 1
    pending.set_result(None)
    assert tier.populate_ahead(lead, Slow()) and Slow.calls == 2
    assert not _tier().populate_ahead(lead, None)
    pinned = _tier()
    pinned.pin_memory = True
    assert not pinned.populate_ahead(lead, InlineWorker())


def test_layers_ask_on_different_tokens():
    tier = _tier(heads=8, d=128, dtype=torch.bfloat16)
    leads = [tier.populate_lead(i) for i in range(64)]
    assert len(set(leads)) == 64 and all(tier._page_rows // 2 <= x < tier._page_rows for x in leads)


def test_decoding_with_a_background_populate_keeps_every_token(monkeypatch):
    """The populate runs on the cache's indexer thread beside the appends that write the rows it backs (ivf-group's
    decode adds are native: the indexer is idle once the index is built): every token reads back as appended."""
    from hetero import HeteroConfig, LayerCache
    from hetero.worker import Worker

    asked = []
    real = HostTier.populate_ahead
    monkeypatch.setattr(HostTier, "populate_ahead", lambda self, lead, w: asked.append(real(self, lead, w)) or asked[-1])
    worker = Worker("test-populate")
    layer = LayerCache(HeteroConfig(window=8, sinks=1, block_tokens=16), indexer=worker)
    gen = torch.Generator().manual_seed(5)
    n = 1200
    keys, values = torch.randn(1, 2, n, 16, generator=gen), torch.randn(1, 2, n, 16, generator=gen)
    layer.append(keys[:, :, :800], values[:, :, :800])
    layer.wait_indexed()  # the build ran on the indexer
    asked.clear()
    for t in range(800, n):
        layer.append(keys[:, :, t], values[:, :, t])
    layer.wait_indexed()
    worker.close()
    assert sum(asked) >= 1
    host = int(layer.host.length[0])
    assert torch.equal(layer.host.keys(0), keys[0, :, 1:1 + host])
    assert torch.equal(layer.host.values(0), values[0, :, 1:1 + host])


def test_a_populator_backs_pages_while_the_indexer_is_busy(monkeypatch):
    """With its indexer never idle (as with faiss or lsh, whose decode adds run there) a layer's populate would be
    skipped on every append; a populator thread of its own (the HF cache gives its layers one) takes it."""
    import threading

    from hetero import HeteroConfig, LayerCache
    from hetero.worker import Worker

    asked = []
    real = HostTier.populate_ahead
    monkeypatch.setattr(HostTier, "populate_ahead", lambda self, lead, w: asked.append(real(self, lead, w)) or asked[-1])
    release = threading.Event()
    indexer, populator = Worker("test-busy-indexer"), Worker("test-populator")
    indexer.submit(release.wait)  # busy until released: every add below queues behind it
    gen = torch.Generator().manual_seed(7)
    n = 400
    keys, values = torch.randn(1, 2, n, 16, generator=gen), torch.randn(1, 2, n, 16, generator=gen)
    layers = [LayerCache(HeteroConfig(window=8, sinks=1, block_tokens=16, retriever="exact"), indexer=indexer,
                         populator=p) for p in (None, populator)]
    try:
        counts = []
        for layer in layers:
            asked.clear()
            for t in range(n):
                layer.append(keys[:, :, t], values[:, :, t])
            counts.append(sum(asked))
        assert counts[0] == 0 and counts[1] >= 1  # the indexer's turn never came; the populator's did
        assert layers[1].host._backed > layers[1].host.rows_reserved
    finally:
        release.set()
        for layer in layers:
            layer.wait_indexed()
        indexer.close()
        populator.close()
    for layer in layers:  # every token reads back as appended, the populate beside the appends included
        host = int(layer.host.length[0])
        assert torch.equal(layer.host.keys(0), keys[0, :, 1:1 + host])
        assert torch.equal(layer.host.values(0), values[0, :, 1:1 + host])


def test_no_room_where_address_space_is_not_free(monkeypatch):
    """Strict overcommit (or not Linux): untouched room would count against the commit limit, so the pool takes the
    1.5x growth with headroom instead."""
    monkeypatch.setattr(memory, "room_is_free", lambda: False)
    tier = _tier()
    _fill(tier, 0, 40, torch.Generator().manual_seed(6))  # 3 blocks: 3 + 3 // 8 + 1 = 4
    assert tier.kv_pool.shape[1] == 4 * 16


def test_the_index_arena_falls_back_when_its_room_is_refused(monkeypatch):
    """An arena whose 4x room is refused takes 1.5x, both arenas or neither, and the index works as usual."""
    import hetero.retrieval.ivf_group.index as ix
    from hetero.native import new_runner
    from hetero.retrieval.ivf_group import SeqIndex

    gen = torch.Generator().manual_seed(7)
    keys, vals = torch.randn(2, 600, 32, generator=gen), torch.randn(2, 600, 32, generator=gen)
    plain = SeqIndex(keys, vals, 16, 0, 4, runner=new_runner(2))
    real, refused = ix.empty_host, []

    def small_only(shape, dtype):
        if dtype == torch.int32 and shape[1] >= ix.RESERVE_FACTOR * plain.used_rows:  # the ids of the 4x room
            refused.append(shape)
            raise RuntimeError("DefaultCPUAllocator: can't allocate memory")
        return real(shape, dtype)

    monkeypatch.setattr(ix, "empty_host", small_only)
    index = SeqIndex(keys, vals, 16, 0, 4, runner=new_runner(2))
    assert refused and index.ids.shape[1] < ix.RESERVE_FACTOR * index.used_rows
    assert index.codes.shape[1] * 16 == index.ids.shape[1]  # the codes of the refused room were not kept
    for name in ("count", "start", "ksum"):
        np.testing.assert_array_equal(getattr(index, name), getattr(plain, name))
    for h in range(2):
        used = int(index.used[h])
        np.testing.assert_array_equal(index.ids[h, :used], plain.ids[h, :used])


def test_a_model_cache_backs_its_layers_pages_on_one_thread_of_its_own():
    """``TieredKVCache`` without a populator (and without an indexer, whose idle turn would be the only other way)
    makes one populate thread for all its layers; each layer's pages are backed ahead of its appends, and the
    thread stops once the cache is dropped."""
    import gc
    import threading

    from hetero import HeteroConfig, TieredKVCache

    cache = TieredKVCache(HeteroConfig(window=8, sinks=1, block_tokens=16, retriever="exact"), num_layers=3)
    assert all(layer.populator is cache.populator for layer in cache.layers)
    gen = torch.Generator().manual_seed(8)
    n = 300
    keys, values = torch.randn(1, 2, n, 16, generator=gen), torch.randn(1, 2, n, 16, generator=gen)
    for t in range(n):
        for layer in cache.layers:
            layer.append(keys[:, :, t], values[:, :, t])
            # a busy thread skips an ask (retried at the next append): on a loaded machine the thread may not run
            # at all while a quick loop appends, so each append waits for it, as a model's layer compute would
            cache.populator.submit(lambda: None).result()
    for layer in cache.layers:
        assert layer.host._backed > layer.host.rows_reserved  # asked ahead of the rows handed out
        assert torch.equal(layer.host.keys(0), keys[0, :, 1:1 + int(layer.host.length[0])])
    thread = cache.populator._thread
    assert thread.is_alive()
    del cache, layer
    gc.collect()
    thread.join(timeout=10)
    assert not thread.is_alive() and thread not in threading.enumerate()
