"""Triton kernels of the fast tier: decode attention over sinks + window, and log-sum-exp merge.

Both are private ``@triton.jit`` functions with explicit strides; ``gpu/triton_window.py`` owns shape
checks, allocation and launch grids. Softmax runs in base 2 inside the kernels (``exp2``), and results
leave in natural log (``lse = lse2 * ln 2``).
"""
import triton
import triton.language as tl

LN2 = tl.constexpr(0.6931471805599453)  # lse leaves in natural log: ln x = log2 x * ln 2


@triton.jit
def _window_decode_kernel(
    Q, K, V, LENGTHS, OUT, LSE,
    stride_qb, stride_qh,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_or, stride_os,
    stride_lr,
    HKV, G, D, SPLIT_LEN, scale_log2,
    BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    UPCAST: tl.constexpr, FP32_DOT: tl.constexpr,
):
    """Program (sequence b * HKV + KV head h, split s): the G query heads of the group, packed into BLOCK_G
    (>= 16) rows, over keys [s * SPLIT_LEN, min((s + 1) * SPLIT_LEN, length[b])).

    Q [B, Hq, D]; K, V [B, HKV, L, D]; LENGTHS [B] int32; OUT [B * Hq, S, D] float32 (normalized partial);
    LSE [B * Hq, S] float32 natural log (-inf for an empty split).
    """
    pid = tl.program_id(0)
    split = tl.program_id(1)
    b = pid // HKV
    h = pid % HKV
    length = tl.load(LENGTHS + b)
    start = split * SPLIT_LEN
    end = tl.minimum(start + SPLIT_LEN, length)

    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    mask_g = offs_g < G
    mask_d = offs_d < D
    q_ptrs = Q + b * stride_qb + (h * G + offs_g)[:, None] * stride_qh + offs_d[None, :]
    q = tl.load(q_ptrs, mask=mask_g[:, None] & mask_d[None, :], other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
    else:
        q = q.to(K.dtype.element_ty)

    m_i = tl.full([BLOCK_G], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_G], dtype=tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], dtype=tl.float32)
    k_base = K + b * stride_kb + h * stride_kh
    v_base = V + b * stride_vb + h * stride_vh
    for n0 in range(start, end, BLOCK_N):
        cols = n0 + offs_n
        mask_n = cols < end
        k = tl.load(k_base + cols[None, :] * stride_kn + offs_d[:, None], mask=mask_n[None, :] & mask_d[:, None],
                    other=0.0)
        if UPCAST:
            k = k.to(tl.float32)
        if FP32_DOT:
            qk = tl.dot(q, k, input_precision="ieee")
        else:
            qk = tl.dot(q, k)
        qk = tl.where(mask_n[None, :], qk * scale_log2, float("-inf"))  # the tail is -inf, not a finite sentinel
        m_new = tl.maximum(m_i, tl.max(qk, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(qk - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(v_base + cols[:, None] * stride_vn + offs_d[None, :], mask=mask_n[:, None] & mask_d[None, :],
                    other=0.0)
        if UPCAST:
            v = v.to(tl.float32)
            pv = p
        else:
            pv = p.to(V.dtype.element_ty)
        if FP32_DOT:
            acc = acc * alpha[:, None] + tl.dot(pv, v, input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.dot(pv, v)
        m_i = m_new

    nonempty = l_i > 0.0
    out = acc / tl.where(nonempty, l_i, 1.0)[:, None]
    lse = tl.where(nonempty, (m_i + tl.log2(tl.where(nonempty, l_i, 1.0))) * LN2, float("-inf"))
    rows = b * HKV * G + h * G + offs_g
    tl.store(OUT + rows[:, None] * stride_or + split * stride_os + offs_d[None, :], out,
             mask=mask_g[:, None] & mask_d[None, :])
    tl.store(LSE + rows * stride_lr + split, lse, mask=mask_g)


@triton.jit
def _merge_kernel(
    PARTS_OUT, PARTS_LSE, OUT, LSE,
    stride_pr, stride_pp,
    stride_lr,
    stride_or,
    P, D,
    BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Program r: fuse P partial results of row r (a (sequence, query head) pair) by log-sum-exp.

    PARTS_OUT [R, P, D], PARTS_LSE [R, P] natural log; OUT [R, D], LSE [R] float32. Empty parts (-inf)
    weigh 0; +inf parts share all the weight; all-empty gives (0, -inf).
    """
    r = tl.program_id(0)
    offs_p = tl.arange(0, BLOCK_P)
    offs_d = tl.arange(0, BLOCK_D)
    mask_p = offs_p < P
    mask_d = offs_d < D
    lse = tl.load(PARTS_LSE + r * stride_lr + offs_p, mask=mask_p, other=float("-inf"))
    m = tl.max(lse, axis=0)
    pos_inf = lse == float("inf")
    any_pos_inf = tl.max(pos_inf.to(tl.int32), axis=0) > 0
    m_safe = tl.where((m == float("-inf")) | (m == float("inf")), 0.0, m)
    w = tl.exp(lse - m_safe)
    w = tl.where(any_pos_inf, pos_inf.to(tl.float32), w)
    total = tl.sum(w, axis=0)
    parts = tl.load(PARTS_OUT + r * stride_pr + offs_p[:, None] * stride_pp + offs_d[None, :],
                    mask=mask_p[:, None] & mask_d[None, :] & (w[:, None] > 0.0), other=0.0)
    out = tl.sum(tl.where(w[:, None] > 0.0, w[:, None] * parts, 0.0), axis=0)
    nonempty = total > 0.0
    out = tl.where(nonempty, out / tl.where(nonempty, total, 1.0), 0.0)
    merged = tl.where(any_pos_inf, m, m_safe + tl.log(tl.where(nonempty, total, 1.0)))
    merged = tl.where(nonempty | any_pos_inf, merged, float("-inf"))
    tl.store(OUT + r * stride_or + offs_d, out, mask=mask_d)
    tl.store(LSE + r, merged)
