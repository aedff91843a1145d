"""ivf-group: the C++ grouped search against its PyTorch reference, index integrity under incremental adds,
training policy and input handling."""
import os
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
import torch

from hetero import HeteroAttention, HeteroConfig, LayerCache
from hetero.native import load

from helpers import isa_level, usable_isa_levels

pytest.importorskip("faiss")
from hetero.retrieval.ivf_group import estimate_torch, search_torch  # noqa: E402

needs_ext = pytest.mark.skipif(load() is None, reason="C++ extension not built")


def _layer(n, hkv=2, d=16, g=3, seed=0, **opts):
    gen = torch.Generator().manual_seed(seed)
    opts.setdefault("min_train", 64)
    cfg = HeteroConfig(window=8, sinks=2, retriever="ivf-group", retriever_options=opts)
    layer = LayerCache(cfg)
    keys = torch.randn(1, hkv, n, d, generator=gen)
    vals = torch.randn(1, hkv, n, d, generator=gen)
    q = torch.randn(1, hkv * g, d, generator=gen)
    return layer, keys, vals, q


def _list_contents(index, h):
    """{list: sorted ids} of head h."""
    return {lst: sorted(index.ids[h, int(index.start[h, lst]):int(index.start[h, lst] + index.count[h, lst])].tolist())
            for lst in range(index.nlist)}


def _check_probe(r, index, qg, ks, n, mask):
    """The kernel's list choice equals the reference's, except where a list's score ties the cut within float
    rounding (numpy's BLAS and the kernel sum in different orders)."""
    want = r.probe_mask(index, qg, ks, n)
    if torch.equal(mask, want):
        return
    scores = torch.from_numpy(np.matmul(qg.numpy(), index.centroids_t))           # [Hkv, G, L]
    for h, p in enumerate(r.nprobe(ks, index.nlist, n)):
        assert mask[h, -1] == want[h, -1]
        cut = scores[h].sort(dim=1, descending=True).values[:, p - 1:p]            # [G, 1] p-th best score
        near = ((scores[h] - cut).abs() <= 1e-5 * scores[h].abs().amax()).any(0)  # lists tying some query's cut
        diff = (mask[h, :-1] != want[h, :-1])
        assert bool((~diff | near).all()), (h, diff.nonzero())


def _compare(r, q, ks):
    """The C++ search against search_torch (same lists, rows, sets) and its estimate of the unselected tokens
    against estimate_torch (float64) for the sets it chose."""
    index = r._seqs[0]
    hkv = r.host.kv_heads
    qg = q[0].float().reshape(hkv, -1, q.shape[-1])
    n = r.ntotal[0]
    qs = r.prescale(index, qg)
    est = (torch.full((qg.shape[0] * qg.shape[1], qg.shape[2]), float("nan")), torch.full((qg.numel() // qg.shape[2],),
                                                                                          float("nan")))
    got = r._search_cpp(index, qg, ks, n, est=est)
    mask = got[5]
    _check_probe(r, index, qg, ks, n, mask)
    want = search_torch(index, qs, mask, ks, n)
    assert torch.equal(got[3], want[3])                                  # rows scanned
    assert torch.equal(got[2], want[2])                                  # union sizes
    for h in range(hkv):
        assert torch.equal(got[1][h, : got[2][h]], want[1][h, : want[2][h]])
        for gq in range(qg.shape[1]):                                     # per-query top sets
            assert torch.equal(got[0][h, gq].sort().values, want[0][h, gq].sort().values)
    per_query = r.group_rule == "per-head" and qg.shape[1] > 1
    out, lse = estimate_torch(index, qg, got[0], got[1], got[2], per_query, r.scale)
    for h, k in enumerate(ks):
        rows = slice(h * qg.shape[1], (h + 1) * qg.shape[1])
        if k == 0:                                                        # no search, no host part: empty
            assert bool((est[1][rows] == float("-inf")).all()) and bool((est[0][rows] == 0).all())
            continue
        assert torch.equal(torch.isinf(est[1][rows]), torch.isinf(lse[h]))
        live = torch.isfinite(lse[h])
        torch.testing.assert_close(est[1][rows][live], lse[h][live], rtol=0, atol=1e-4)
        torch.testing.assert_close(est[0][rows], out[h], rtol=1e-4, atol=1e-5)
    return got


@needs_ext
@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("d,g", [(16, 1), (16, 3), (24, 4), (64, 5), (32, 8), (136, 4)])
def test_cpp_search_matches_torch_reference(d, g, bits):
    """Dp = 16 .. 160: one 64-byte chunk per row or several, the last one partial (4-bit rows are Dp / 2 bytes)."""
    layer, keys, vals, q = _layer(900, d=d, g=g, code_bits=bits)
    layer.append(keys, vals)
    r = layer.retriever
    n = r.ntotal[0]
    for ks in ([1, 1], [7, 30], [0, 5], [n, n], [40, 0]):
        _compare(r, q, ks)


@needs_ext
@pytest.mark.parametrize("bits", [8, 4])
def test_cpp_search_is_exact_top_k_over_scanned_rows(bits):
    """Every selected row scores >= every scanned row left out (against the quantized codes)."""
    layer, keys, vals, q = _layer(1500, g=4, code_bits=bits)
    layer.append(keys, vals)
    r = layer.retriever
    index, k = r._seqs[0], 25
    qg = q[0].reshape(2, 4, -1)
    qs = r.prescale(index, qg)
    out = r._search_cpp(index, qg, [k, k], r.ntotal[0])
    top, mask = out[0], out[5]
    for h in range(2):
        rows = np.concatenate([np.arange(int(index.start[h, lst]), int(index.start[h, lst] + index.count[h, lst]))
                               for lst in mask[h].nonzero().flatten().tolist()])
        scores = qs.scores(h, index.row_codes(h, rows)).T               # [n_scan, G]
        ids = torch.from_numpy(index.ids[h][rows])
        for gq in range(4):
            chosen = torch.isin(ids, top[h, gq])
            assert int(chosen.sum()) == k
            assert scores[chosen, gq].min() >= scores[~chosen, gq].max()


def _check_scores():
    """The active ISA's code scoring equals QueryCodes.scores exactly (integer dot products, then one float32
    multiply), for 8-bit and packed 4-bit rows: row counts around the kernels' blocks of 4 and 16, one or several
    64-byte chunks per row, query counts around the blocks of 4."""
    from hetero.native import load
    from hetero.retrieval.ivf_group import QueryCodes, block_rows

    ext = load()
    gen = torch.Generator().manual_seed(5)
    for bits in (8, 4):
        for dp in (32, 64, 96, 160):
            for g in (1, 3, 4, 5, 8):
                for n in (0, 1, 3, 4, 5, 15, 16, 17, 37):
                    codes = torch.randint(0, 1 << bits, (n, dp), dtype=torch.uint8, generator=gen).numpy()
                    qc = QueryCodes(torch.randint(-127, 128, (1, g, dp), dtype=torch.int8, generator=gen),
                                    torch.rand(1, g, generator=gen) + 0.5)
                    packed = codes[:, : dp // 2] | (codes[:, dp // 2:] << 4) if bits == 4 else codes
                    packed = block_rows(np.ascontiguousarray(packed))         # the arena's blocked layout
                    out = torch.full((g, n), float("nan"))
                    ext.ivf_scores(packed.ctypes.data, n, dp, bits, qc.qi.data_ptr(), qc.qscale.data_ptr(), g,
                                   out.data_ptr())
                    assert torch.equal(out, qc.scores(0, codes)), (bits, dp, g, n)


def _check_centroid_scores():
    """The active ISA's probing scores (queries against every list's float16 centroid) equal a float64 product within
    float32 rounding: list counts around the kernels' tiles of 8, 16 and 32 and their prefetch distance, query
    counts around the blocks of 4, odd head dims."""
    from hetero.native import load

    ext = load()
    gen = torch.Generator().manual_seed(6)
    for d in (1, 40, 128):
        for g in (1, 3, 4, 5, 8):
            for lists in (0, 1, 7, 15, 16, 17, 31, 32, 33, 47, 48, 49, 95, 96, 97, 1025):
                q = torch.randn(g, d, generator=gen)
                cent = (torch.randn(d, lists, generator=gen) / d ** 0.5).half()
                out = torch.full((g, lists), float("nan"))
                ext.ivf_centroid_scores(q.data_ptr(), g, d, cent.view(torch.int16).data_ptr(), lists, out.data_ptr())
                ref = q.double() @ cent.double()
                tol = 1e-5 * (q.double().abs() @ cent.double().abs()) + 1e-7
                assert ((out.double() - ref).abs() <= tol).all(), (d, g, lists)


@needs_ext
def test_cpp_search_at_every_isa_level():
    usable = usable_isa_levels()
    code = (
        "import sys; sys.path.insert(0, {tests!r}); import torch\n"
        "from test_ivf_group import _layer, _compare\n"
        "from test_ivf_group import _check_scores, _check_centroid_scores; _check_scores(); _check_centroid_scores()\n"
        "for bits in (8, 4):\n"
        "    layer, keys, vals, q = _layer(700, d=40, g=5, code_bits=bits)\n"
        "    layer.append(keys, vals)\n"
        "    _compare(layer.retriever, q, [9, 21])\n"
        "from hetero.native import info; print(info()['isa'], info()['ivf_scan'])\n"
    ).format(tests=os.path.dirname(__file__))
    scans = {}
    for isa in usable:
        env = dict(os.environ, HETERO_CPU_ISA=isa)
        p = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
        assert p.returncode == 0, p.stderr[-2000:]
        assert p.stdout.split()[-2] == isa
        scans[isa] = p.stdout.split()[-1]
    from hetero.tools.envinfo import _cpu_flags

    if "avx512_bf16" in usable and "avx512_vnni" in _cpu_flags():  # both AVX-512 scan kernels were exercised
        assert scans["avx512_bf16"] == "avx512_vnni" and scans["avx512"] == "avx512"


def test_incremental_adds_equal_one_batch_add_and_keep_every_token_once():
    """Token-by-token adds (which overflow lists and move them, and grow the arena) leave the same list contents
    as one batch add of the same keys on the same training; every host position is in exactly one list."""
    a, keys, vals, q = _layer(2000)
    b = LayerCache(a.config)
    a.append(keys[:, :, :300], vals[:, :, :300])   # trains on the 290 tokens past the fast tier
    b.append(keys[:, :, :300], vals[:, :, :300])
    for t in range(300, 1100):
        a.append(keys[:, :, t], vals[:, :, t])
    b.append(keys[:, :, 300:1100], vals[:, :, 300:1100])
    ia, ib = a.retriever._seqs[0], b.retriever._seqs[0]
    sa = a.retriever.search(q, [12])  # before flushing: a's newest keys sit in the always-scanned tail
    assert ia.tail == (a.host.length[0] - ia.flush_phase) % 64 > 0 and ib.tail == 0  # flushed at layer 0's phase
    ia.flush()
    assert a.retriever.trained_on[0] == b.retriever.trained_on[0]      # no retrain in between
    assert ia.arena_rows > 1.2 * a.retriever.trained_on[0]              # the arena grew
    n = a.host.length[0]
    for h in range(2):
        la, lb = _list_contents(ia, h), _list_contents(ib, h)
        assert la == lb
        assert sorted(sum(la.values(), [])) == list(range(n))
    assert torch.equal(a.retriever.search(q, [12]).indices, b.retriever.search(q, [12]).indices)
    assert sa.indices.shape[0] == 1


def _index_pair(bits, hkv=3, n=600, d=40, nlist=16, same_assignment=True):
    """Two SeqIndex of the same keys: one keeping its lists natively (a Runner), one in numpy. same_assignment: the
    numpy one assigns keys with the native kernel too (numpy's BLAS sums in another order: a near-tie may go to
    another list), so that what differs between them is the flush's move and list statistics alone."""
    from hetero.native import new_runner
    from hetero.retrieval.ivf_group import SeqIndex

    gen = torch.Generator().manual_seed(5)
    keys, vals = torch.randn(hkv, n, d, generator=gen), torch.randn(hkv, n, d, generator=gen)
    fast = SeqIndex(keys, vals, nlist, 0, bits, runner=new_runner(2))
    if not same_assignment:
        return fast, SeqIndex(keys, vals, nlist, 0, bits)
    slow = SeqIndex(keys, vals, nlist, 0, bits, runner=new_runner(2))
    slow.runner, slow.assign = None, fast.assign  # numpy from here on, but for the assignment (same centroids)
    return fast, slow


_INDEX_ARRAYS = ("codes", "ids", "start", "count", "cap", "used", "ksum", "vsum", "vmean", "mean_norm", "centroids_t",
                 "assign_t")


def _array(index, name):
    """An index's array; of the arenas, each head's rows handed out to its lists, one after another (the room after
    them is never written or read)."""
    if name in ("codes", "ids"):  # arenas_in_use: each head's codes, then its ids
        return np.concatenate(index.arenas_in_use()[name == "ids"::2])
    return getattr(index, name)


@needs_ext
def test_arena_rows_are_cleared_as_they_are_handed_out(monkeypatch):
    """The arenas are allocated with room (4x the rows asked for: address space) and not zeroed: the rows handed to a
    list, at the build and when a full list moves to the end, are cleared then. An index whose arenas start as
    garbage holds the same lists, rows and ids as one whose start as zeros, through flushes and moves."""
    import hetero.retrieval.ivf_group.index as ix
    from hetero.retrieval.ivf_group import TAIL_TOKENS

    real = ix.empty_host
    indexes = []
    for poison in (0, 0x5A):
        with monkeypatch.context() as m:
            m.setattr(ix, "empty_host", lambda shape, dtype: real(shape, dtype).fill_(poison))
            index, _ = _index_pair(4)
            hkv, d = index.count.shape[0], index.centroids_t.shape[1]
            gen = torch.Generator().manual_seed(7)
            for step in range(2 * TAIL_TOKENS + 5):  # list 0 fills and moves in every head
                keys = torch.randn(hkv, 1, d, generator=gen)
                keys += 4.0 * torch.from_numpy(index.assign_t[:, :, 0].astype(np.float32))[:, None] * (step % 3 > 0)
                index.add(keys, torch.randn(hkv, 1, d, generator=gen), 600 + step)
            indexes.append(index)
    clean, dirty = indexes
    moved = (clean.start[:, 0] >= clean.used - clean.cap[:, 0]).all()  # list 0 sits last in every head: it moved
    assert moved and clean.arena_rows >= ix.RESERVE_FACTOR * clean.used_rows // 2  # and room lies ahead
    for name in _INDEX_ARRAYS:
        np.testing.assert_array_equal(_array(dirty, name), _array(clean, name), err_msg=name)


@needs_ext
@pytest.mark.parametrize("bits", [8, 4])
def test_native_tail_flush_equals_the_numpy_flush(bits):
    """The tail's move into its lists in a native call: the same lists, rows, ids, sums, means and directions, bit
    for bit, as the numpy path given the same assignment, over flushes in which a list overflows and moves to the
    arena's end, a flush forced early and decode-sized adds."""
    from hetero.retrieval.ivf_group import TAIL_TOKENS

    fast, slow = _index_pair(bits)
    hkv, d = fast.count.shape[0], fast.centroids_t.shape[1]
    starts = fast.start.copy()
    gen = torch.Generator().manual_seed(6)
    pos = 600
    for step in range(3 * TAIL_TOKENS + 9):
        # most keys near list 0's trained direction (it overflows), the rest at random
        n = 1 if step % 7 else 3
        keys = torch.randn(hkv, n, d, generator=gen)
        keys[:, :, :] += 4.0 * torch.from_numpy(fast.assign_t[:, :, 0].astype(np.float32))[:, None] * (step % 3 > 0)
        vals = torch.randn(hkv, n, d, generator=gen)
        for index in (fast, slow):
            index.add(keys.clone(), vals.clone(), pos)
        pos += n
        if step == 100:
            fast.flush()
            slow.flush()
    assert (fast.start[:, 0] != starts[:, 0]).all()              # list 0 moved in every head
    for name in _INDEX_ARRAYS:
        np.testing.assert_array_equal(_array(fast, name), _array(slow, name), err_msg=name)
    assert fast.tail_starts == slow.tail_starts and fast.tail == slow.tail
    for h in range(hkv):                                          # every position in exactly one list or the tail
        tail = fast.ids[h, int(fast.start[h, fast.nlist]):int(fast.start[h, fast.nlist]) + fast.tail].tolist()
        assert sorted(sum(_list_contents(fast, h).values(), []) + tail) == list(range(pos))


@needs_ext
def test_a_crop_across_native_flushes_equals_the_numpy_path():
    """A crop (``truncate``) back past several flushes, then more adds: the natively kept index equals the numpy one
    bit for bit, and holds every remaining position once."""
    fast, slow = _index_pair(8)
    hkv, d = fast.count.shape[0], fast.centroids_t.shape[1]
    gen = torch.Generator().manual_seed(11)
    added = {}                                                    # host position -> (key, value) [Hkv, D]

    def grow(pos, steps):
        for step in range(steps):
            n = 1 + (step % 5 == 0)
            keys, vals = torch.randn(hkv, n, d, generator=gen), torch.randn(hkv, n, d, generator=gen)
            for j in range(n):
                added[pos + j] = (keys[:, j], vals[:, j])
            for index in (fast, slow):
                index.add(keys.clone(), vals.clone(), pos)
            pos += n
        return pos

    def rows(which, a, b):
        return torch.stack([added[p][which] for p in range(a, b)], dim=1)

    pos = grow(600, 150)
    cut = pos - 100                                               # back past at least one flush
    assert sum(x > cut for x in fast.tail_starts) >= 1
    for index in (fast, slow):
        index.truncate(cut, lambda a, b: rows(0, a, b), lambda a, b: rows(1, a, b))
    pos = grow(cut, 90)
    for name in _INDEX_ARRAYS:
        np.testing.assert_array_equal(_array(fast, name), _array(slow, name), err_msg=name)
    assert fast.tail_starts == slow.tail_starts
    for h in range(hkv):
        tail = fast.ids[h, int(fast.start[h, fast.nlist]):int(fast.start[h, fast.nlist]) + fast.tail].tolist()
        assert sorted(sum(_list_contents(fast, h).values(), []) + tail) == list(range(pos))


@needs_ext
def test_native_tail_flush_refuses_a_list_without_room_and_changes_nothing():
    fast, _ = _index_pair(8)
    for j in range(30):                                           # 600 + 30: not at a flush point
        fast.add(torch.randn(3, 1, 40), torch.randn(3, 1, 40), 600 + j)
    t = fast.tail
    room = int((fast.cap[:, 0] - fast.count[:, 0]).min())
    assert t > room
    before = {name: _array(fast, name).copy() for name in _INDEX_ARRAYS}
    args = fast._tail_args(t)
    for bad_list, keys in ((0, t), (fast.nlist, t), (-1, t), (1, t - 1)):  # no room; out of range (twice); wrong t
        fast._tail_assign[...] = bad_list
        with pytest.raises(ValueError, match="lacks room"):
            fast.runner.ivf_tail_flush(*args[:3], keys, *args[4:])
        for name, arr in before.items():
            np.testing.assert_array_equal(_array(fast, name), arr, err_msg=name)


@needs_ext
def test_assignment_is_the_same_whatever_the_keys_beside_it():
    """A key's list is the largest inner product with the trained centroids (float64 check, ties excepted), and
    the same whether it is assigned alone, in a decode-sized batch or in a prefill-sized one (pool chunks)."""
    fast, slow = _index_pair(8, nlist=64, same_assignment=False)
    keys = torch.randn(3, 300, 40, generator=torch.Generator().manual_seed(7))
    whole = fast.assign(keys)
    parts = torch.cat([fast.assign(keys[:, s:s + 7].contiguous()) for s in range(0, 300, 7)], dim=1)
    assert torch.equal(whole, parts)
    assert torch.equal(fast.assign(keys[1:2].contiguous(), head0=1), whole[1:2])
    scores = torch.einsum("hnd,hdl->hnl", keys.double(), torch.from_numpy(fast.assign_t.astype(np.float64)))
    best = scores.max(dim=2).values
    chosen = scores.gather(2, whole[:, :, None])[:, :, 0]
    assert bool(((best - chosen) <= 1e-5 * best.abs()).all())
    assert (whole == slow.assign(keys)).float().mean() > 0.99   # numpy: the same up to float32 ties


def test_layers_flush_their_tails_on_different_tokens():
    """A model's layers reach their tail flushes on different decode tokens (the flush is the longest part of the
    step that has one): each layer every 64 tokens at its own phase, no two of 6 layers on the same token."""
    from hetero.retrieval.ivf_group import TAIL_TOKENS

    layer, keys, vals, _ = _layer(600, d=16)
    layers = [LayerCache(layer.config, layer_idx=i) for i in range(6)]
    for cache in layers:
        cache.append(keys[:, :, :300], vals[:, :, :300])
        for t in range(300, 600):                                    # decode steps: the native append where it can
            cache.append(keys[:, :, t], vals[:, :, t])
    flushes = [cache.retriever._seqs[0].tail_starts[1:] for cache in layers]   # host positions after each flush
    for i, points in enumerate(flushes):
        assert len(points) >= 4
        assert all(np.diff(points) == TAIL_TOKENS)
        assert len({p % TAIL_TOKENS for p in points}) == 1
    assert len({points[0] % TAIL_TOKENS for points in flushes}) == len(layers)


@needs_ext
def test_an_add_of_several_keys_that_passes_the_flush_point_flushes():
    """A multi-key add (chunked prefill, speculative decoding) that passes the layer's flush point flushes there,
    so the layer keeps its own phase."""
    fast, _ = _index_pair(8)
    assert fast.flush_phase == 0 and 600 % 64 == 24
    pos = 600
    while pos < 640:                                              # adds of 3: [600, 603) ... [639, 642) passes 640
        fast.add(torch.randn(3, 3, 40), torch.randn(3, 3, 40), pos)
        pos += 3
    assert fast.tail_starts[-1] == 642 and fast.tail == 0


def test_the_add_that_fills_the_tail_runs_inline():
    """With the native flush, the decode add that fills the tail (and assigns it) runs in the step's own thread:
    handing it to the background worker cost ~0.7 ms of GIL hand-off on top of a flush the step waits for."""
    from hetero.retrieval.ivf_group import TAIL_TOKENS
    from hetero.worker import Worker

    indexer = Worker("test-flush-inline")
    layer, keys, vals, q = _layer(400, d=16, g=1)
    layer = LayerCache(layer.config, indexer=indexer)
    layer.append(keys[:, :, :200], vals[:, :, :200])
    layer.wait_indexed()
    index = layer.retriever._seqs[0]
    t = 200
    while index.tail < TAIL_TOKENS - 1:
        layer.append(keys[:, :, t], vals[:, :, t])
        t += 1
    layer.wait_indexed()
    layer.append(keys[:, :, t], vals[:, :, t])
    native = index.runner is not None
    assert (not layer.index._pending) == native and (index.tail == 0) == native
    layer.wait_indexed()
    assert index.tail == 0
    indexer.close()


@pytest.mark.parametrize("bits", [8, 4])
def test_codes_reproduce_scores_up_to_quantization(bits):
    layer, keys, vals, q = _layer(800, d=32, g=1, code_bits=bits)
    layer.append(keys, vals)
    index = layer.retriever._seqs[0]
    k_host = layer.host.keys(0).float()                                   # [Hkv, N, D]
    for h in range(2):
        seg = np.zeros(index.arena_rows, dtype=bool)
        for lst in range(index.nlist):
            s = int(index.start[h, lst])
            seg[s:s + int(index.count[h, lst])] = True
        rows = np.nonzero(seg)[0]
        live = torch.from_numpy(index.ids[h][rows]).long()
        approx = torch.from_numpy(index.row_codes(h, rows)[:, :32]).float() * index.step[h] + index.vmin[h]
        err = (approx - k_host[h, live]).abs().max(dim=0).values
        assert bool((err <= index.step[h] * 0.5 + 1e-5).all())


def test_query_quantization_bounds_the_score_error():
    """int8 queries: each score is within half a quantization step per code of the float query's score, the
    largest |qi| is 127, and a zero query quantizes to zeros (no division by zero)."""
    from hetero.retrieval.ivf_group import QueryCodes

    gen = torch.Generator().manual_seed(3)
    qs = torch.randn(3, 5, 40, generator=gen) * torch.logspace(-3, 2, 40)   # very different dims
    qs[2, 4] = 0.0
    codes = torch.randint(0, 256, (300, 48), dtype=torch.uint8, generator=gen).numpy()
    codes[:, 40:] = 0                                                        # the zero padding of Dp
    qc = QueryCodes.quantize(qs, 48)
    assert qc.qi.shape == (3, 5, 48) and qc.qi.dtype == torch.int8 and bool((qc.qi[..., 40:] == 0).all())
    assert torch.equal(qc.qi[2, 4], torch.zeros(48, dtype=torch.int8)) and float(qc.qscale[2, 4]) == 1.0
    assert int(qc.qi[:2].abs().amax(-1).min()) == 127
    c = torch.from_numpy(codes).double()
    for h in range(3):
        exact = qs[h].double() @ c[:, :40].T                                 # [G, n]
        bound = 0.5 * qc.qscale[h].double()[:, None] * c.sum(1)[None, :] + 1e-3
        assert bool(((qc.scores(h, codes).double() - exact).abs() <= bound).all())


@needs_ext
def test_cpp_query_quantization_equals_the_reference():
    """The search quantizes its queries itself (one call, no numpy on the decode path): bit for bit the same as
    QueryCodes.quantize of q * step, with a zero query, dimensions of very different scale, values that land
    exactly on .5 steps (round half to even) and zero padding from D to Dp."""
    from hetero.retrieval.ivf_group import QueryCodes

    ext = load()
    gen = torch.Generator().manual_seed(4)
    d, dp, g = 40, 48, 6
    q = torch.randn(g, d, generator=gen) * torch.logspace(-3, 2, d)
    q[1] = 0.0
    q[2, :4] = torch.tensor([127.0, 0.5, 1.5, -2.5])                    # qscale 1: exact halves
    q[2, 4:] = 0.0
    step = torch.rand(d, generator=gen) + 0.1
    step[:4] = 1.0
    want = QueryCodes.quantize((q * step)[None], dp)
    qi = torch.full((g, dp), 99, dtype=torch.int8)
    qscale = torch.empty(g)
    ext.ivf_quantize_queries(q.data_ptr(), step.data_ptr(), g, d, dp, qi.data_ptr(), qscale.data_ptr())
    assert torch.equal(qi, want.qi[0]) and torch.equal(qscale, want.qscale[0])
    assert qi[2, :4].tolist() == [127, 0, 2, -2]


@needs_ext
def test_cpp_query_scale_is_finite_and_positive_for_any_query():
    """The search ranks its scores with order keys that assume no NaN, and no pass looks for one: a score is an
    integer sum times qscale, so qscale must be finite and positive for every query the kernel may be handed,
    NaN, inf and values whose products with the code steps overflow float32 included."""
    ext = load()
    d, dp = 8, 16
    step = torch.full((d,), 2.0)
    rows = [torch.zeros(d), torch.full((d,), float("nan")), torch.full((d,), float("inf")),
            torch.full((d,), -float("inf")), torch.full((d,), 3e38), torch.tensor([float("nan"), 1.0] * 4),
            torch.tensor([float("inf"), float("nan")] + [1e-30] * 6), torch.full((d,), 2e-44)]  # |x| / 127 -> 0
    q = torch.stack(rows).contiguous()
    qi = torch.empty((len(rows), dp), dtype=torch.int8)
    qscale = torch.full((len(rows),), float("nan"))
    ext.ivf_quantize_queries(q.data_ptr(), step.data_ptr(), len(rows), d, dp, qi.data_ptr(), qscale.data_ptr())
    assert bool(torch.isfinite(qscale).all()) and bool((qscale > 0).all()), qscale
    assert int(qi.abs().max()) <= 127 and bool((qi[:, d:] == 0).all())
    assert float(qscale[-1]) == 1.0 and bool((qi[-1] == 0).all())  # as a zero query (QueryCodes.quantize too)
    from hetero.retrieval.ivf_group import QueryCodes

    assert torch.equal(QueryCodes.quantize((q[-1:] * step)[None], dp).qi[0, 0], qi[-1])


def test_sum_rule_over_huge_queries_searches_without_crashing():
    """The sum rule searches with the sum of the group's queries, which overflowed float32 for finite queries near
    its limit: centroid scores of inf - inf = NaN then reached the probe's selection, whose histogram index they
    overflowed (a segfault). Queries beyond attention's limit (1e15) are now refused; at the limit each KV head gets
    its k rows. In a subprocess: a crash must fail this test, not end the run."""
    import subprocess
    import sys

    script = """
import torch
from hetero import HeteroConfig, LayerCache
gen = torch.Generator().manual_seed(0)
cfg = HeteroConfig(window=16, sinks=0, budget=50, retriever="ivf-group", group_rule="sum",
                   retriever_options={"min_train": 64})
layer = LayerCache(cfg)
layer.append(torch.randn(1, 2, 3000, 32, generator=gen), torch.randn(1, 2, 3000, 32, generator=gen))
layer.wait_indexed()
from hetero import InvalidValueError
q = torch.randn(1, 8, 32, generator=gen)
q[0, :4, :5], q[0, :4, 5:10] = 3e38, -3e38
try:
    layer.retriever.search(q, [50])
except InvalidValueError as e:
    print("refused:", e)
q[0, :4, :5], q[0, :4, 5:10] = 1e15, -1e15
idx = layer.retriever.search(q, [50]).indices[0]
print([int(((row >= 0) & (row < 3000)).sum()) for row in idx])
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    lines = done.stdout.split("\n")
    assert lines[0].startswith("refused: q holds values up to 3e+38") and lines[-2] == "[50, 50]", done.stdout


def test_a_search_item_that_throws_on_a_pool_thread_raises_and_leaves_the_runner_usable():
    """Every item of this search asks for a bitmap over 2^61 host positions, which cannot be allocated: on a pool
    worker that ended the process (std::terminate), on the calling thread it unwound the run while the workers were
    still in it. Now the call raises MemoryError once no thread is in it, and the next search on the same runner
    gives what it gave before. In a subprocess: a crash must fail this test, not end the run."""
    script = """
import numpy as np, torch
from hetero import HeteroConfig, LayerCache, native
gen = torch.Generator().manual_seed(0)
layer = LayerCache(HeteroConfig(window=16, sinks=0, budget=50, retriever="ivf-group",
                                retriever_options={"min_train": 64}))
layer.append(torch.randn(1, 4, 3000, 32, generator=gen), torch.randn(1, 4, 3000, 32, generator=gen))
layer.wait_indexed()
q = torch.randn(1, 8, 32, generator=gen)
runner = native.new_runner(2)

class HugeTokenCounts:  # the same call with n_tokens = 2^61 for every item (argument 17)
    def __init__(self, inner):
        self.inner, self.n = inner, np.full(4, 1 << 61, dtype=np.int64)
    def ivf_search(self, *args):
        args = list(args)
        args[17] = self.n.ctypes.data
        self.inner.ivf_search(*args)

layer.retriever.use_runner(runner)
want = layer.retriever.search(q, [50]).indices.clone()
layer.retriever.use_runner(HugeTokenCounts(runner))
raised = 0
for _ in range(20):  # items go to either thread: twenty calls reach both
    try:
        layer.retriever.search(q, [50])
    except MemoryError:
        raised += 1
layer.retriever.use_runner(runner)
print(raised, torch.equal(layer.retriever.search(q, [50]).indices, want))
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split("\n")[-2] == "20 True", done.stdout


@pytest.mark.parametrize("bits,row_bytes", [(8, 32), (4, 16)])
def test_memory_and_bytes_per_token(bits, row_bytes):
    layer, keys, vals, q = _layer(3000, d=24, code_bits=bits)
    layer.append(keys, vals)
    r = layer.retriever
    index = r._seqs[0]
    assert r.bytes_per_token() == row_bytes + 4 and index.codes[0].nbytes == index.arena_rows * row_bytes
    n = r.ntotal[0] * 2
    assert n * r.bytes_per_token() <= r.memory_bytes() < 3 * n * r.bytes_per_token() + 200_000
    held = r.buffers()  # what a tool reading the index's memory gets: each head's arena rows in use, the statistics
    for h, used in enumerate(index.used.tolist()):
        assert any(np.shares_memory(a, index.codes[h]) and len(a) == used // 16 and a.flags.c_contiguous for a in held)
        assert any(np.shares_memory(a, index.ids[h]) and len(a) == used and a.flags.c_contiguous for a in held)
    assert sum(a.nbytes for a in held) <= r.memory_bytes()


def test_retrains_when_tier_outgrows_training_and_scans_exactly_before():
    layer, keys, vals, q = _layer(2000, min_train=300, retrain_factor=2.0)
    layer.append(keys[:, :, :200], vals[:, :, :200])
    assert layer.retriever._seqs[0] is None
    sel = layer.retriever.search(q, [5])
    assert layer.retriever.last_scanned == q.shape[1] * layer.host.length[0]
    exact = LayerCache(HeteroConfig(window=8, sinks=2, retriever="exact"))
    exact.append(keys[:, :, :200], vals[:, :, :200])
    assert torch.equal(sel.indices, exact.retriever.search(q, [5]).indices)
    layer.append(keys[:, :, 200:320], vals[:, :, 200:320])
    first = layer.retriever.trained_on[0]
    assert first == layer.host.length[0] >= 300
    layer.append(keys[:, :, 320:1500], vals[:, :, 320:1500])
    assert layer.retriever.trained_on[0] > 2 * first - 1
    assert layer.retriever.ntotal[0] == layer.host.length[0]


@pytest.mark.parametrize("rule", ["union", "per-head", "sum"])
def test_group_rules(rule):
    _, keys, vals, q = _layer(1200, g=3)
    cfg = HeteroConfig(window=8, sinks=2, retriever="ivf-group", group_rule=rule, retriever_options={"min_train": 64})
    layer = LayerCache(cfg)
    layer.append(keys, vals)
    sel = layer.retriever.search(q, [10])
    width = int((sel.indices[0] >= 0).sum(dim=1).max())
    if rule == "sum":
        assert width == 10 and sel.log_weight is None
    else:
        assert 10 <= width <= 30
    if rule == "per-head":
        chosen = torch.isfinite(sel.log_weight[0])                        # [Hq, width]
        assert bool((chosen.sum(dim=1) == 10).all())


@pytest.mark.parametrize("rule", ["union", "per-head"])
def test_batch_with_an_untrained_sequence(rule):
    """Ragged batch: sequence 0 is indexed, sequence 1 is below min_train (exact scan); one Selection for both."""
    gen = torch.Generator().manual_seed(3)
    cfg = HeteroConfig(window=8, sinks=2, retriever="ivf-group", group_rule=rule, retriever_options={"min_train": 200})
    layer = LayerCache(cfg)
    layer.append(torch.randn(2, 2, 700, 16, generator=gen), torch.randn(2, 2, 700, 16, generator=gen),
                 torch.tensor([700, 120]))
    assert layer.retriever._seqs[0] is not None and layer.retriever._seqs[1] is None
    q = torch.randn(2, 6, 16, generator=gen)
    sel = layer.retriever.search(q, [9, 9])
    from hetero.retrieval.exact import ExactTopK

    exact = ExactTopK(layer.host, group_rule=rule)
    for seq in range(2):
        exact.add(seq, layer.host.keys(seq))
    want = exact.search(q, [9, 9])
    width = int((want.indices[1] >= 0).sum(dim=1).max())
    assert torch.equal(sel.indices[1][:, :width], want.indices[1][:, :width])
    assert bool((sel.indices[1][:, width:] == -1).all())
    if rule == "per-head":
        assert torch.equal(sel.log_weight[1][:, :width], want.log_weight[1][:, :width])
    for h in range(2):
        row = sel.indices[0, h][sel.indices[0, h] >= 0]
        assert len(row) >= 9 and bool((row[1:] > row[:-1]).all())


def test_newest_tokens_in_the_tail_are_searched_and_later_assigned():
    layer, keys, vals, q = _layer(900, g=1)
    layer.append(keys[:, :, :800], vals[:, :, :800])
    index = layer.retriever._seqs[0]
    hot = q[0].reshape(2, 16)[None] * 10.0                   # [1, Hkv, D]: aligned with each head's query
    layer.append(hot, vals[:, :, 800])
    for t in range(8):                                       # 8 more tokens push the hot one out of the window
        layer.append(keys[:, :, 801 + t], vals[:, :, 801 + t])
    assert index.tail == 9
    hot_pos = layer.host.length[0] - 1                       # evicted by the last append
    assert torch.equal(layer.host.keys(0)[:, hot_pos].float(), hot[0].to(layer.host.keys(0).dtype).float())
    assert all(hot_pos in layer.retriever.search(q, [3]).indices[0, h].tolist() for h in range(2))
    for t in range(64):                                      # fill the tail: it is assigned to lists
        layer.append(keys[:, :, 809 + t], vals[:, :, 809 + t])
    assert index.tail < 64
    assert int(index.count[0, : index.nlist].sum()) + index.tail == layer.host.length[0]
    assert all(hot_pos in layer.retriever.search(q, [3]).indices[0, h].tolist() for h in range(2))


@pytest.mark.parametrize("bits", [8, 4])
def test_inline_tail_adds_keep_order_with_queued_background_adds(bits):
    """Cheap tail adds run inline only when nothing is queued; behind a queued add they queue too. Across
    delays, flushes and a retrain, every host position ends up indexed exactly once."""
    import random
    import time

    from hetero.worker import Worker

    indexer = Worker("test-inline")
    gen = torch.Generator().manual_seed(8)
    # 16 lists of ~40+ keys: list capacities, and so each head's tail segment start, differ between heads
    cfg = HeteroConfig(window=8, sinks=2, retriever="ivf-group", retriever_options={"min_train": 64, "nlist": 16,
                                                                                   "code_bits": bits})
    layer = LayerCache(cfg, indexer=indexer)
    n = 700
    keys, vals = torch.randn(1, 2, n, 16, generator=gen), torch.randn(1, 2, n, 16, generator=gen)
    layer.append(keys[:, :, :100], vals[:, :, :100])
    rng = random.Random(0)
    inline = 0
    for t in range(100, n):
        if rng.random() < 0.05:
            indexer.submit(time.sleep, 0.01)          # an unrelated job delays the queue
        before = len(layer.index._pending)
        layer.append(keys[:, :, t], vals[:, :, t])
        inline += len(layer.index._pending) == before
        if rng.random() < 0.1:
            layer.wait_indexed()
    layer.wait_indexed()
    index = layer.retriever._seqs[0]
    assert layer.retriever.trained_on[0] > 100          # retrained on the way (4x growth)
    assert 0 < inline < n - 100                          # both paths were taken
    assert index.start[0, index.nlist] != index.start[1, index.nlist]
    k_host = layer.host.keys(0).float()
    for h in range(2):
        tail = slice(int(index.start[h, index.nlist]), int(index.start[h, index.nlist]) + index.tail)
        got = sorted(sum(_list_contents(index, h).values(), []) + index.ids[h, tail].tolist())
        assert got == list(range(layer.host.length[0]))
        # every row's code decodes to its own key (the tail included): no row written into another head's list
        for lst in list(range(index.nlist)) + [index.nlist]:
            seg = slice(int(index.start[h, lst]), int(index.start[h, lst] + index.count[h, lst]))
            ids = torch.from_numpy(index.ids[h, seg]).long()
            rows = np.arange(seg.start, seg.stop)
            approx = torch.from_numpy(index.row_codes(h, rows)[:, :16]).float() * index.step[h] + index.vmin[h]
            top = index.vmin[h] + index.levels * index.step[h]
            want = torch.minimum(torch.maximum(k_host[h, ids], index.vmin[h]), top)
            assert bool(((approx - want).abs() <= index.step[h] * 0.5 + 1e-4).all())  # later keys clamp to range
    indexer.close()


@needs_ext
def test_missed_mass_estimate_tracks_the_scanned_rows():
    """ivf-group reports, per query head, log of the attention mass (scaled logits) on scanned rows outside its
    flat top-k; a strided-sample estimate, compared here with the exact sum over the same rows."""
    layer, keys, vals, q = _layer(6000, d=32, g=4, nlist=16)
    layer.append(keys, vals)
    r = layer.retriever
    r.report_missed = True                                      # what head_budget="adaptive" turns on
    sel = r.search(q, [[40, 120]])                              # k_ref = 80
    index, n = r._seqs[0], r.ntotal[0]
    qg = q[0].reshape(2, 4, -1)
    qs = r.prescale(index, qg)
    mask = r._search_cpp(index, qg, [40, 120], n)[5]                 # the lists the search scanned
    assert sel.indices.shape[1] == 2
    for h in range(2):
        rows = np.concatenate([np.arange(int(index.start[h, lst]), int(index.start[h, lst] + index.count[h, lst]))
                               for lst in mask[h].nonzero().flatten().tolist()])
        logits = qs.scores(h, index.row_codes(h, rows))                   # [G, n_scan], bias omitted
        logits = r.softmax_scale * (logits + (qg[h] * index.vmin[h]).sum(-1, keepdim=True))
        rest = logits.sort(dim=1, descending=True).values[:, 80:]
        want = torch.logsumexp(rest, dim=1)
        got = r.last_missed_lse[0, h * 4:(h + 1) * 4]
        assert bool(((got - want).abs() < 0.15).all()), (got, want)


@pytest.mark.parametrize("bad", [2, 16, True, "4"])
def test_code_bits_option_is_validated(bad):
    from hetero.errors import ConfigError

    with pytest.raises(ConfigError, match="code_bits.*4 or 8"):
        LayerCache(HeteroConfig(retriever="ivf-group", retriever_options={"code_bits": bad})).append(
            torch.randn(1, 1, 4, 8), torch.randn(1, 1, 4, 8))


@needs_ext
@pytest.mark.parametrize("bits", [8, 4])
def test_decode_adds_encode_like_the_numpy_path(bits, monkeypatch):
    """A decode step's tail append encodes in one C++ call: the same codes and ids, byte for byte, as the numpy
    encoding, keys beyond the trained range (clamped) included."""
    import hetero.native as cpp

    layers = [_layer(700, d=40, g=2, code_bits=bits, seed=3) for _ in range(2)]
    gen = torch.Generator().manual_seed(9)
    new = torch.randn(1, 2, 150, 40, generator=gen) * torch.linspace(0.5, 3.0, 40)   # some dims out of range
    for i, (layer, keys, vals, q) in enumerate(layers):
        layer.append(keys, vals)
        with monkeypatch.context() as m:
            if i == 1:                                            # the Python append and the numpy encoding
                m.setattr(layer, "_native_ok", False)
                m.setattr(cpp, "load", lambda: None)
            for t in range(new.shape[2]):
                layer.append(new[:, :, t], new[:, :, t])
        layer.wait_indexed()
    a, b = (layer.retriever._seqs[0] for layer, *_ in layers)
    assert a.codes.shape == b.codes.shape and a.tail == b.tail
    np.testing.assert_array_equal(_array(a, "codes"), _array(b, "codes"))
    np.testing.assert_array_equal(_array(a, "ids"), _array(b, "ids"))
    np.testing.assert_array_equal(a.count, b.count)


@needs_ext
@settings(max_examples=150, deadline=None)
@given(data=st.data())
def test_cpp_top_positions_is_exact_with_ties(data):
    """The native top-k (the search's and the probe's) against a stable sort: the k largest, ties at the k-th score
    to the lower positions, over tie-heavy, constant, outlier-stretched and signed-zero scores, at every ISA level up
    to the CPU's (the selection's threshold pass has a scalar and an AVX-512 form)."""
    n = data.draw(st.integers(0, 5000), label="n")
    k = data.draw(st.integers(0, n), label="k")
    kind = data.draw(st.sampled_from(["normal", "few_values", "constant", "outliers", "zeros"]), label="kind")
    gen = np.random.default_rng(data.draw(st.integers(0, 2 ** 32 - 1), label="seed"))
    if kind == "normal":
        s = gen.standard_normal(n)
    elif kind == "few_values":
        s = gen.integers(-3, 4, n).astype(np.float64)
    elif kind == "constant":
        s = np.full(n, 1.5)
    elif kind == "outliers":  # a wide key range with the mass in one narrow band
        s = 1.0 + 1e-6 * gen.standard_normal(n)
        s[gen.integers(0, max(n, 1), min(n, 3))] = [1e30, -1e30, 0.0][: min(n, 3)]
    else:
        s = np.where(gen.random(n) < 0.5, -0.0, 0.0)
    s = s.astype(np.float32)
    out = np.full(k, -1, dtype=np.int32)
    with isa_level(data.draw(st.integers(0, len(usable_isa_levels()) - 1), label="level")):
        load().ivf_top_positions(s.ctypes.data, n, k, out.ctypes.data)
    want = np.sort(np.argsort(-s, kind="stable")[:k])  # stable: equal scores keep ascending positions
    assert np.array_equal(out, want.astype(np.int32)), (kind, n, k)


@needs_ext
def test_the_fused_step_reports_the_keys_it_scanned_as_the_python_search_does():
    """``last_scanned`` / ``keys_read`` after a C++ step's own search equal those of the same search made from Python
    (the profiler's floor and ``hetero bench retrieval`` read them); they were 0 after the fused step."""
    gen = torch.Generator().manual_seed(3)
    keys, vals = torch.randn(1, 2, 3000, 16, generator=gen), torch.randn(1, 2, 3000, 16, generator=gen)
    q = torch.randn(1, 6, 16, generator=gen)
    got = []
    for overlap in (False, True):  # the fused step, then the general path (its search from Python)
        cfg = HeteroConfig(window=64, sinks=2, budget=0.05, retriever="ivf-group", overlap=overlap,
                           retriever_options={"min_train": 256})
        layer = LayerCache(cfg)
        layer.append(keys, vals)
        layer.wait_indexed()
        attn = HeteroAttention(layer.config)
        plan = attn.plan(layer, 6)
        assert plan.fused is not overlap
        attn.run(q, layer, plan)
        r = layer.retriever
        got.append((r.last_scanned, r.keys_read()))
    assert got[0] == got[1] and got[0][0] == 3 * got[0][1] > 0


@pytest.mark.parametrize("rule", ["union", "per-head", "sum"])
def test_before_training_the_unselected_rows_are_attended_exactly(rule):
    """Until the index is trained the search scores every host key; the estimate of the rows it leaves out is then
    exact, so the step equals dense attention (it was empty: their mass was dropped, 4.4 off)."""
    from helpers import oracle, rel_err

    layer, keys, vals, q = _layer(200, min_train=10_000)
    layer = LayerCache(HeteroConfig(window=8, sinks=2, budget=5, retriever="ivf-group", group_rule=rule,
                                    retriever_options={"min_train": 10_000}))
    layer.append(keys, vals)
    assert layer.retriever._seqs[0] is None
    out = HeteroAttention(layer.config).run(q, layer)
    assert rel_err(out, oracle(q, layer)) < 1e-5
