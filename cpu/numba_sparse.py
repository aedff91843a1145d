"""Numba sparse host-attention backend.

Same contract as the C++ kernel: work items (sequence, KV head, index chunk) in a ``prange``; per item the
selected rows in tiles of ``tile_rows`` with the softmax rescaled online between tiles, each K and V row read once
for the G query heads of the group. Per tile: scores (four queries per pass over a row), ``p = exp(s - max)`` (a
vectorized polynomial), ``sum p v`` (two value rows per pass over the accumulators); chunk partials fused by
log-sum-exp. bf16 and fp16 rows are stored as uint16 bits; bf16 is widened in registers (an LLVM bitcast
intrinsic), fp16 in a per-item buffer (Numba has no CPU float16 type). K and V rows are prefetched into L2
``prefetch_rows`` ahead (the score pass), and K rows (score pass) and V rows (value pass) into L1 ``near_rows``
ahead, through LLVM intrinsics: with the L2 prefetch alone the dots read their K rows at DRAM speed (AMD Zen 5,
bf16, k 2048: 2.04 ms per call against 0.92-1.0 ms with the L1 prefetch). Compiled with ``cache=True``;
``warmup()`` compiles (or loads from cache) every dtype ahead of the first decode step. The ``prange`` runs on
numba's TBB layer where the ``tbb`` wheel is installed (``hetero.numba_setup.load_tbb``): under omp the workers
sleep as soon as a call ends and take fixed shares of the next (``hetero/numba_setup.py``).
"""
from __future__ import annotations

import math

import numpy as np
import torch
from llvmlite import ir

from hetero.numba_setup import load_tbb, prefer_wide_vectors

prefer_wide_vectors()  # must run before numba is first imported (see hetero/numba_setup.py)
load_tbb()  # before numba launches its threading layer

from numba import njit, prange  # noqa: E402
from numba.core import cgutils, types  # noqa: E402
from numba.extending import intrinsic  # noqa: E402

from hetero.backends import HostBackend  # noqa: E402
from hetero.merge import merge  # noqa: E402
from hetero.types import PartialAttention  # noqa: E402

_MODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
_FASTMATH = {"reassoc", "contract"}  # lets LLVM vectorize the dot-product reductions; no nnan/ninf (we use -inf)


def _prefetch_codegen(locality: int):
    def codegen(context, builder, signature, args):
        arrty = signature.args[0]
        ary = context.make_array(arrty)(context, builder, args[0])
        ptr = cgutils.get_item_pointer(context, builder, arrty, ary, [args[1]])
        i8p = ir.IntType(8).as_pointer()
        i32 = ir.IntType(32)
        fnty = ir.FunctionType(ir.VoidType(), [i8p, i32, i32, i32])
        fn = cgutils.get_or_insert_function(builder.module, fnty, "llvm.prefetch.p0")
        builder.call(fn, [builder.bitcast(ptr, i8p), i32(0), i32(locality), i32(1)])
        return context.get_dummy_value()

    return codegen


@intrinsic
def _prefetch(typingctx, arr, index):
    """``__builtin_prefetch(&arr[index], read, 3)``: into L1 (prefetcht0)."""
    return types.void(arr, index), _prefetch_codegen(3)


@intrinsic
def _prefetch_l2(typingctx, arr, index):
    """``__builtin_prefetch(&arr[index], read, 1)``: into L2 (prefetcht2)."""
    return types.void(arr, index), _prefetch_codegen(1)


@intrinsic
def _bf16(typingctx, bits):
    """bf16 bits (uint16) -> float32: the high half of a float32 (zero-extend, shift, bitcast; vectorizes)."""
    sig = types.float32(bits)
    integer = isinstance(bits, types.Integer)

    def codegen(context, builder, signature, args):
        if not integer:  # a float32 pool: typed on the bf16 branch of a kernel compiled per pool dtype, never run
            return context.cast(builder, args[0], signature.args[0], types.float32)
        wide = builder.zext(args[0], ir.IntType(32))
        return builder.bitcast(builder.shl(wide, ir.Constant(ir.IntType(32), 16)), ir.FloatType())

    return sig, codegen


@njit(cache=True, inline="always")
def _prefetch_row(arr, off, lines, line_elems, to_l1):
    """Ask for the ``lines`` cache lines of the row at ``arr[off]``: into L1 when ``to_l1`` (a constant at every
    call site), else into L2."""
    for line in range(lines):
        if to_l1:
            _prefetch(arr, off + line * line_elems)
        else:
            _prefetch_l2(arr, off + line * line_elems)


@njit(cache=True, inline="always", fastmath=_FASTMATH)
def _widen(src, off, n, mode, bits, out, at=0):
    """Row ``src[off:off+n]`` as float32 into ``out[at:at+n]`` (``bits`` is ``out`` viewed as uint32)."""
    if mode == 0:
        for d in range(n):
            out[at + d] = src[off + d]
    elif mode == 1:  # bf16: the high half of a float32
        for d in range(n):
            bits[at + d] = np.uint32(src[off + d]) << np.uint32(16)
    else:  # fp16: move exponent/mantissa into place, rebias by multiplying with 2^112 (handles subnormals)
        for d in range(n):
            h = np.uint32(src[off + d])
            body = (h & np.uint32(0x7FFF)) << np.uint32(13)
            bits[at + d] = body
            out[at + d] = out[at + d] * np.float32(5.192296858534828e33)
            if (h & np.uint32(0x7C00)) == np.uint32(0x7C00):  # inf / NaN
                bits[at + d] = body | np.uint32(0x7F800000)
            bits[at + d] = bits[at + d] | ((h & np.uint32(0x8000)) << np.uint32(16))


@njit(cache=True, inline="always", fastmath=_FASTMATH)
def _exp_shifted(x, shift, ebits, evals):
    """``x = exp(x - shift)`` in place; below -87.3 (and -inf) exactly 0. The C++ kernel's polynomial in two
    loops LLVM vectorizes (2^n built from bits in ``ebits``, read back as ``evals``): ``np.exp`` on float32 is a
    scalar libm call per element here (no SVML), ~11 ns per bf16 row of 4 scores."""
    n = x.shape[0]
    for i in range(n):
        t = x[i] - shift
        tiny = t < np.float32(-87.3)
        t = min(max(t, np.float32(-87.3)), np.float32(88.3))
        kf = np.floor(t * np.float32(1.44269504088896341) + np.float32(0.5))
        r = t - kf * np.float32(0.693359375)
        r = r - kf * np.float32(-2.12194440e-4)
        p = np.float32(1.0 / 720)
        p = p * r + np.float32(1.0 / 120)
        p = p * r + np.float32(1.0 / 24)
        p = p * r + np.float32(1.0 / 6)
        p = p * r + np.float32(0.5)
        p = p * r + np.float32(1.0)
        p = p * r + np.float32(1.0)
        x[i] = np.float32(0.0) if tiny else p
        ebits[i] = np.uint32(np.int32(kf) + np.int32(127)) << np.uint32(23)
    for i in range(n):
        x[i] *= evals[i]


@njit(cache=True, inline="always", fastmath=_FASTMATH)
def _elem(row, e, bf16):
    """``row[e]`` as float32: bf16 bits widened in registers when ``bf16`` (a constant at every call site). The
    index is taken as unsigned: an offset + lane index that Numba cannot prove >= 0 otherwise gets a negative-index
    wraparound per element, which stops LLVM from vectorizing the row loops."""
    i = np.uintp(e)
    return _bf16(row[i]) if bf16 else np.float32(row[i])


@njit(cache=True, inline="always", fastmath=_FASTMATH)
def _accumulate2(acc, p, j0, j1, vsrc, off0, off1, g_size, d, bf16, rows=2):
    """``acc[g] += p[g, j0] v0 + p[g, j1] v1`` with ``v0 = vsrc[off0:off0+d]``, ``v1 = vsrc[off1:off1+d]`` (one
    row when ``rows == 1``): each accumulator element is loaded and stored once per two value rows. Rows are read
    by offset, not sliced: a slice increments and decrements the pool's shared reference count, an atomic on one
    cache line that every thread touched per row (2 threads ran at 1.2x of one)."""
    for g in range(g_size):
        p0 = p[g, j0]
        p1 = p[g, j1] if rows == 2 else np.float32(0.0)
        for e in range(d):
            acc[g, e] += p0 * _elem(vsrc, off0 + e, bf16) + p1 * _elem(vsrc, off1 + e, bf16)


@njit(cache=True, inline="always", fastmath=_FASTMATH)
def _accumulate_rows(acc, p, j0, j1, vflat, off0, off1, vbuf, vbits, mode, g_size, d, rows):
    """``_accumulate2`` over the value rows at ``vflat[off0]`` and ``vflat[off1]`` in the pool's dtype ``mode``:
    fp32 and bf16 read in place; fp16 from ``vbuf``, where row ``j0`` was widened into ``vbuf[:d]`` before and
    row ``j1`` is widened into ``vbuf[d:]`` here (``rows == 2``)."""
    if mode == 0:
        _accumulate2(acc, p, j0, j1, vflat, off0, off1, g_size, d, False, rows)
    elif mode == 1:
        _accumulate2(acc, p, j0, j1, vflat, off0, off1, g_size, d, True, rows)
    elif rows == 2:
        _widen(vflat, off1, d, mode, vbits, vbuf, d)
        _accumulate2(acc, p, j0, j1, vbuf, 0, d, g_size, d, False, 2)
    else:
        _accumulate2(acc, p, j0, j1, vbuf, 0, 0, g_size, d, False, 1)


@njit(cache=True, inline="always", fastmath=_FASTMATH)
def _dot_group(qg, src, off, d, g_size, out, bf16):
    """``out[g] = qg[g] . src[off:off+d]`` for the group's queries, four per pass over the row (each element
    loaded once for four queries: 86 -> 76 ns per bf16 row from L1, G = 4, D = 128)."""
    g = 0
    while g + 4 <= g_size:
        s0 = np.float32(0.0)
        s1 = np.float32(0.0)
        s2 = np.float32(0.0)
        s3 = np.float32(0.0)
        for e in range(d):
            x = _elem(src, off + e, bf16)
            s0 += qg[g, e] * x
            s1 += qg[g + 1, e] * x
            s2 += qg[g + 2, e] * x
            s3 += qg[g + 3, e] * x
        out[g] = s0
        out[g + 1] = s1
        out[g + 2] = s2
        out[g + 3] = s3
        g += 4
    for g in range(g, g_size):
        s = np.float32(0.0)
        for e in range(d):
            s += qg[g, e] * _elem(src, off + e, bf16)
        out[g] = s


@njit(parallel=True, cache=True, fastmath=_FASTMATH)
def _sparse_kernel(q, kflat, vflat, head_stride, row_stride, table, block_tokens, block_shift, idx, lw, has_lw,
                   scale, mode, chunks, chunk_len, part_out, part_lse, prefetch_rows, near, line_elems, tile_rows):
    b_size, hq, d = q.shape
    hkv, k = idx.shape[1], idx.shape[2]
    g_size = hq // hkv
    neg_inf = np.float32(-np.inf)
    lines = (d + line_elems - 1) // line_elems
    for item in prange(b_size * hkv * chunks):
        head = item // chunks
        c = item - head * chunks
        b = head // hkv
        h = head - b * hkv
        j0 = min(k, c * chunk_len)
        j1 = min(k, j0 + chunk_len)
        n = j1 - j0
        rows = np.empty(n, np.int64)
        dots = np.empty(g_size, np.float32)  # per item: a shared [items, G] array put two threads on one line
        ebits = np.empty(tile_rows, np.uint32)
        evals = ebits.view(np.float32)
        scores = np.empty((g_size, tile_rows), np.float32)
        m = np.full(g_size, neg_inf, np.float32)
        tile_max = np.empty(g_size, np.float32)
        total = np.zeros(g_size, np.float32)
        buf = np.empty(d, np.float32)
        bits = buf.view(np.uint32)
        vbuf = np.empty(2 * d, np.float32)  # fp16: a pair of value rows widened
        vbits = vbuf.view(np.uint32)
        acc = np.zeros((g_size, d), np.float32)
        qg = np.empty((g_size, d), np.float32)  # the group's queries, contiguous
        for g in range(g_size):
            for e in range(d):
                qg[g, e] = q[b, h * g_size + g, e]
        for j in range(n):
            pos = np.int64(idx[b, h, j0 + j])
            if pos < 0:
                rows[j] = -1
                continue
            if block_shift >= 0:  # a power-of-two block: shift and mask, not Python's floor division and modulo
                blk, off = pos >> block_shift, pos & (block_tokens - 1)
            else:
                blk, off = pos // block_tokens, pos % block_tokens
            rows[j] = h * head_stride + (np.int64(table[b, blk]) * block_tokens + off) * row_stride
        # tiles of rows, softmax rescaled online between them: a tile's V rows, asked for into L2 during its
        # score pass, are still there for its value pass (one pass of scores over all n rows, then one of
        # values, let 2 x n rows through L2 in between and read the V rows from DRAM a second time)
        for t0 in range(0, n, tile_rows):
            tn = min(tile_rows, n - t0)
            for g in range(g_size):
                tile_max[g] = neg_inf
            for jj in range(tn):
                j = t0 + jj
                if prefetch_rows > 0 and j + prefetch_rows < n and rows[j + prefetch_rows] >= 0:
                    _prefetch_row(kflat, rows[j + prefetch_rows], lines, line_elems, False)
                    _prefetch_row(vflat, rows[j + prefetch_rows], lines, line_elems, False)
                if near > 0 and j + near < n and rows[j + near] >= 0:
                    _prefetch_row(kflat, rows[j + near], lines, line_elems, True)
                r = rows[j]
                if r < 0:
                    for g in range(g_size):
                        scores[g, jj] = neg_inf
                    continue
                if mode == 0:
                    _dot_group(qg, kflat, r, d, g_size, dots, False)
                elif mode == 1:
                    _dot_group(qg, kflat, r, d, g_size, dots, True)
                else:
                    _widen(kflat, r, d, mode, bits, buf)
                    _dot_group(qg, buf, 0, d, g_size, dots, False)
                for g in range(g_size):
                    s = dots[g] * scale
                    if has_lw:
                        s += lw[b, h * g_size + g, j0 + j]
                    scores[g, jj] = s
                    if s > tile_max[g]:
                        tile_max[g] = s
            for g in range(g_size):
                if tile_max[g] > m[g]:
                    if m[g] > neg_inf:
                        alpha = np.float32(np.exp(m[g] - tile_max[g]))
                        total[g] *= alpha
                        for e in range(d):
                            acc[g, e] *= alpha
                    m[g] = tile_max[g]
                if m[g] > neg_inf:
                    _exp_shifted(scores[g, :tn], m[g], ebits, evals)
                else:
                    scores[g, :tn] = 0.0
            pending = -1  # a valid row waiting for a partner: value rows are accumulated two at a time
            for jj in range(tn):
                j = t0 + jj
                if near > 0 and j + near < n and rows[j + near] >= 0:
                    _prefetch_row(vflat, rows[j + near], lines, line_elems, True)
                r = rows[j]
                if r < 0:
                    continue
                if pending < 0:
                    pending = jj
                    if mode == 2:
                        _widen(vflat, r, d, mode, vbits, vbuf)
                    continue
                r0 = rows[t0 + pending]
                _accumulate_rows(acc, scores, pending, jj, vflat, r0, r, vbuf, vbits, mode, g_size, d, 2)
                pending = -1
            if pending >= 0:
                r0 = rows[t0 + pending]
                _accumulate_rows(acc, scores, pending, pending, vflat, r0, r0, vbuf, vbits, mode, g_size, d, 1)
            for g in range(g_size):
                for jj in range(tn):
                    total[g] += scores[g, jj]
        for g in range(g_size):
            if total[g] > 0.0:
                inv = np.float32(1.0) / total[g]
                for e in range(d):
                    part_out[item, g, e] = acc[g, e] * inv
                part_lse[item, g] = m[g] + np.log(total[g])
            else:
                for e in range(d):
                    part_out[item, g, e] = 0.0
                part_lse[item, g] = neg_inf


def _shift(block_tokens: int) -> int:
    """log2 of a power-of-two block size, else -1."""
    return block_tokens.bit_length() - 1 if block_tokens > 0 and block_tokens & (block_tokens - 1) == 0 else -1


def _flat(pool: torch.Tensor) -> np.ndarray:
    """A 1-D array starting at the pool's first element and covering all of it (bf16/fp16 as uint16)."""
    span = sum((s - 1) * st for s, st in zip(pool.shape, pool.stride())) + 1 if pool.numel() else 0
    flat = torch.as_strided(pool.detach(), (span,), (1,))
    if pool.dtype in (torch.bfloat16, torch.float16):
        flat = flat.view(torch.int16)
    arr = flat.numpy()
    return arr.view(np.uint16) if arr.dtype == np.int16 else arr


class NumbaSparseBackend(HostBackend):
    """Host attention in Numba (``prange`` over sequence x KV head x index chunk)."""

    name = "numba"
    devices = ("cpu",)
    prefetch_rows = 64  # K and V rows this far ahead into L2 (score pass)
    near_rows = 16  # K rows (score pass) and V rows (value pass) this far ahead into L1
    tile_rows = 128  # rows per online-softmax tile: its K and V rows (64 KB in bf16 at D = 128) stay in L2

    def __init__(self) -> None:
        import numba

        self._numba = numba
        self._threads = numba.config.NUMBA_NUM_THREADS

    def set_threads(self, threads: int) -> None:
        self._threads = max(1, min(int(threads), self._numba.config.NUMBA_NUM_THREADS))
        self._numba.set_num_threads(self._threads)

    def warmup(self) -> None:
        """Compile (or load from the on-disk cache) the kernel for every supported dtype."""
        from hetero.tiers import HostTier
        from hetero.types import Selection

        for dtype in _MODES:
            tier = HostTier(1, 1, 8, dtype, 4)
            tier.append(0, torch.zeros(1, 4, 8, dtype=dtype), torch.zeros(1, 4, 8, dtype=dtype))
            for lw in (None, torch.zeros(1, 1, 2)):
                self(torch.zeros(1, 1, 8), tier.view(), Selection(torch.zeros(1, 1, 2, dtype=torch.int32), lw), 1.0)

    def __call__(self, q, host, selection, scale) -> PartialAttention:
        b, hq, d = q.shape
        hkv = host.k_pool.shape[0]
        g = hq // hkv
        k_pool, v_pool = host.k_pool, host.v_pool
        idx = selection.indices.to(torch.int32).contiguous()
        k = idx.shape[2]
        heads = b * hkv
        chunks = max(1, min(math.ceil(2 * self._threads / heads), k // 256))
        chunk_len = math.ceil(k / chunks) if k else 0
        has_lw = selection.log_weight is not None
        lw = (selection.log_weight.detach().to(torch.float32).contiguous() if has_lw else torch.zeros(1, 1, 1)).numpy()
        part_out = np.empty((heads * chunks, g, d), np.float32)
        part_lse = np.empty((heads * chunks, g), np.float32)
        elem = k_pool.element_size()
        _sparse_kernel(
            q.detach().to(torch.float32).contiguous().numpy(), _flat(k_pool), _flat(v_pool), k_pool.stride(0),
            k_pool.stride(1), host.block_table.to(torch.int32).contiguous().numpy(), host.block_tokens,
            _shift(host.block_tokens),
            idx.numpy(), lw, has_lw, np.float32(scale), _MODES[k_pool.dtype], chunks, chunk_len, part_out,
            part_lse, self.prefetch_rows, self.near_rows, 64 // elem, self.tile_rows,
        )
        out = torch.from_numpy(part_out).view(b, hkv, chunks, g, d)
        lse = torch.from_numpy(part_lse).view(b, hkv, chunks, g)
        if chunks > 1:
            out, lse = out.permute(2, 0, 1, 3, 4).reshape(chunks, b, hq, d), lse.permute(2, 0, 1, 3).reshape(chunks, b, hq)
            return merge([PartialAttention(out[c], lse[c]) for c in range(chunks)])
        return PartialAttention(out.reshape(b, hq, d), lse.reshape(b, hq))
