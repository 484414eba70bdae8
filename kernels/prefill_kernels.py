"""The Triton kernels of a prefill chunk's attention with the exact EMA scores (ALGORITHM.md §3-§5); launched by
kernels/prefill_triton.py, which holds their block shapes.

Two passes, each one body (`_forward`, `_scores`) for both key layouts; the constexpr PAGED picks the layout, and
the untaken branch is not compiled:
- unpaged (`forward_kernel`, `scores_kernel`): K, V [B, Hkv, n_k, D] hold the keys in attention order, already
  rotated: `[sinks | cache | chunk]`, the first n_k - n_q seen by every query, the last n_q the chunk's own (causal);
- PAGED (`paged_forward_kernel`, `paged_scores_kernel`): K, V are the cache's own buffers (keys before RoPE): key
  j < n_past lives at slot ORDER[j] and is rotated at position j, the chunk's key m comes from KN, VN and is
  rotated at n_past + m; q·k is two dots over D/2 of the rotated halves (kernels/rope.py).
Pass 1 is the flash forward, writing out and per query log2(w_m) - lse2_m; pass 2 owns a block of keys and sums
w_m p(m, j) = exp2(s2 + that bias) over the queries, exactly. `gather_rotate_kernel` writes the paged keys out
rotated, in attention order, for the unpaged kernels.

Each layout compiles to the SASS its kernel had before the two were merged (bench/kernel_sass.py: the same opcodes
in the same order for all six; where an unpaged loop differs from the paged one beyond the key loads, it is written
out in its own branch for that reason). Logits live in the log2 domain: s2 = q·k · scale · log2(e).
"""
from __future__ import annotations

from ._triton import jit as _jit
from ._triton import tl
from .blocks import key_sources, online_softmax, softmax_step, store_forward
from .rope import load_either, load_rotated, load_rotated_either


@_jit
def _attend_cached(q1, q2, kc_base, vc_base, ORDER, COS, SIN, cols, offs_m, offs_h, offs_d, n_past,
                   stride_kcn, stride_vcn, stride_cs, qk_scale, m_i, l_i, acc,
                   HALF: tl.constexpr, MASKED: tl.constexpr):
    """A block of cached keys (columns `cols` < n_past: slot ORDER[j], position j) for every query row."""
    ok = cols < n_past
    slot = tl.load(ORDER + cols, mask=ok, other=0).to(tl.int64)
    k1t, k2t = load_rotated(  # [D/2, BLOCK_N]
        kc_base + slot[None, :] * stride_kcn + offs_h[:, None],
        COS + cols[None, :] * stride_cs + offs_h[:, None], SIN + cols[None, :] * stride_cs + offs_h[:, None],
        ok[None, :], HALF)
    s = tl.dot(q2, k2t, tl.dot(q1, k1t)) * qk_scale
    if MASKED:
        s = tl.where(ok[None, :], s, float("-inf"))
    v = tl.load(vc_base + slot[:, None] * stride_vcn + offs_d[None, :], mask=ok[:, None], other=0.0)
    return softmax_step(s, v, m_i, l_i, acc)


@_jit
def _attend_chunk(q1, q2, kn_base, vn_base, COS, SIN, cols, offs_m, offs_h, offs_d, n_q, n_past,
                  stride_knn, stride_vnn, stride_cs, qk_scale, m_i, l_i, acc,
                  HALF: tl.constexpr, MASKED: tl.constexpr):
    """A block of the chunk's own keys (columns `cols` < n_q, position n_past + j); MASKED applies j <= m."""
    ok = cols < n_q
    pos = n_past + cols
    k1t, k2t = load_rotated(
        kn_base + cols[None, :] * stride_knn + offs_h[:, None],
        COS + pos[None, :] * stride_cs + offs_h[:, None], SIN + pos[None, :] * stride_cs + offs_h[:, None],
        ok[None, :], HALF)
    s = tl.dot(q2, k2t, tl.dot(q1, k1t)) * qk_scale
    if MASKED:
        s = tl.where((cols[None, :] <= offs_m[:, None]) & ok[None, :], s, float("-inf"))
    v = tl.load(vn_base + cols[:, None] * stride_vnn + offs_d[None, :], mask=ok[:, None], other=0.0)
    return softmax_step(s, v, m_i, l_i, acc)


@_jit
def _forward(
    Q, K, V, ORDER, KN, VN, COS, SIN, OUT, BIAS, EMA,
    stride_qb, stride_qh, stride_qm,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_knb, stride_knh, stride_knn,
    stride_vnb, stride_vnh, stride_vnn,
    stride_cs,
    stride_ob, stride_oh, stride_om,
    n_q, n_past, n_k, n_heads, group, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, WITH_SCORES: tl.constexpr,
    PAGED: tl.constexpr,
):
    """Pass 1: flash forward of BLOCK_M queries of one query head over its KV head's keys. Writes out and, for
    the scores, BIAS[b, h, m] = log2(w_m) - lse2_m (lse2: base-2 log-sum-exp).

    Unpaged, the keys are walked in one grid of BLOCK_N from key 0: the blocks every row sees unmasked, then
    the diagonal. PAGED, the cache and the chunk are walked in grids of their own: the cache's whole blocks, its
    ragged last one, then the chunk's blocks below the diagonal and the diagonal. The blocks differ, so the two
    layouts round differently; each is what its kernel always did."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // n_heads).to(tl.int64)  # int64 offsets: h·stride overflows int32 past 2^31 elements
    h = (pid_bh % n_heads).to(tl.int64)
    kvh = h // group
    HALF: tl.constexpr = HEAD_DIM // 2
    if not PAGED:
        n_c = n_k - n_q  # sinks + cache: visible to every query
    m_start = pid_m * BLOCK_M
    offs_m = m_start + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_h = tl.arange(0, HALF)
    offs_d = tl.arange(0, HEAD_DIM)
    if PAGED:
        p_q = Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qm + offs_h[None, :]
        q1 = tl.load(p_q, mask=offs_m[:, None] < n_q, other=0.0)
        q2 = tl.load(p_q + HALF, mask=offs_m[:, None] < n_q, other=0.0)
    else:
        q = tl.load(Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :],
                    mask=offs_m[:, None] < n_q, other=0.0)
    k_base = K + b * stride_kb + kvh * stride_kh
    v_base = V + b * stride_vb + kvh * stride_vh
    if PAGED:
        kn_base = KN + b * stride_knb + kvh * stride_knh
        vn_base = VN + b * stride_vnb + kvh * stride_vnh
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    if PAGED:
        # sinks and cache: seen by every query; whole blocks need no mask on the logits, the ragged last one does
        n_full = (n_past // BLOCK_N) * BLOCK_N
        for start_n in range(0, n_full, BLOCK_N):
            m_i, l_i, acc = _attend_cached(q1, q2, k_base, v_base, ORDER, COS, SIN, start_n + offs_n, offs_m,
                                           offs_h, offs_d, n_past, stride_kn, stride_vn, stride_cs, qk_scale, m_i,
                                           l_i, acc, HALF, False)
        for start_n in range(n_full, n_past, BLOCK_N):
            m_i, l_i, acc = _attend_cached(q1, q2, k_base, v_base, ORDER, COS, SIN, start_n + offs_n, offs_m,
                                           offs_h, offs_d, n_past, stride_kn, stride_vn, stride_cs, qk_scale, m_i,
                                           l_i, acc, HALF, True)
        # the chunk's keys: key j is seen by query m iff j <= m; keys below the block's first query by all its rows
        hi_free = ((m_start + 1) // BLOCK_N) * BLOCK_N
        for start_n in range(0, hi_free, BLOCK_N):
            m_i, l_i, acc = _attend_chunk(q1, q2, kn_base, vn_base, COS, SIN, start_n + offs_n, offs_m, offs_h,
                                          offs_d, n_q, n_past, stride_knn, stride_vnn, stride_cs, qk_scale, m_i, l_i,
                                          acc, HALF, False)
        for start_n in range(hi_free, tl.minimum(n_q, m_start + BLOCK_M), BLOCK_N):
            m_i, l_i, acc = _attend_chunk(q1, q2, kn_base, vn_base, COS, SIN, start_n + offs_n, offs_m, offs_h,
                                          offs_d, n_q, n_past, stride_knn, stride_vnn, stride_cs, qk_scale, m_i, l_i,
                                          acc, HALF, True)
    else:
        # keys j <= n_c + m_start are seen by every row of the block: no mask
        hi_free = ((n_c + m_start + 1) // BLOCK_N) * BLOCK_N
        for start_n in range(0, hi_free, BLOCK_N):
            cols = start_n + offs_n
            kt = tl.load(k_base + cols[None, :] * stride_kn + offs_d[:, None])  # [D, BLOCK_N]
            s = tl.dot(q, kt) * qk_scale
            m_i, l_i, p, alpha = online_softmax(s, m_i, l_i)
            # v after the statistics, not before as `softmax_step` takes it: loading it earlier changes the schedule
            v = tl.load(v_base + cols[:, None] * stride_vn + offs_d[None, :])
            acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None])
        # the diagonal: chunk key j is seen by query m iff j <= n_c + m
        hi = tl.minimum(n_k, n_c + m_start + BLOCK_M)
        for start_n in range(hi_free, hi, BLOCK_N):
            cols = start_n + offs_n
            kt = tl.load(k_base + cols[None, :] * stride_kn + offs_d[:, None], mask=cols[None, :] < n_k, other=0.0)
            s = tl.dot(q, kt) * qk_scale
            visible = (cols[None, :] <= offs_m[:, None] + n_c) & (cols[None, :] < n_k)
            s = tl.where(visible, s, float("-inf"))
            m_i, l_i, p, alpha = online_softmax(s, m_i, l_i)
            v = tl.load(v_base + cols[:, None] * stride_vn + offs_d[None, :], mask=cols[:, None] < n_k, other=0.0)
            acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None])
    store_forward(OUT, BIAS, EMA, b, h, pid_bh, offs_m, offs_d, n_q, stride_ob, stride_oh, stride_om, m_i, l_i, acc,
                  WITH_SCORES)

# The entry points keep the parameter lists the two kernels had before their bodies were merged: where a parameter
# sits in the constant bank changes how ptxas schedules the prologue, and with these lists both layouts compile to
# the SASS they compiled to apart (bench/kernel_sass.py).


@_jit
def forward_kernel(
    Q, K, V, OUT, BIAS, EMA,
    stride_qb, stride_qh, stride_qm,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_ob, stride_oh, stride_om,
    n_q, n_k, n_heads, group, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, WITH_SCORES: tl.constexpr,
):
    """Pass 1 over keys in attention order (`_forward`, unpaged)."""
    _forward(Q, K, V, K, K, V, K, K, OUT, BIAS, EMA, stride_qb, stride_qh, stride_qm, stride_kb, stride_kh,
             stride_kn, stride_vb, stride_vh, stride_vn, 0, 0, 0, 0, 0, 0, 0, stride_ob, stride_oh, stride_om,
             n_q, 0, n_k, n_heads, group, qk_scale, HEAD_DIM, BLOCK_M, BLOCK_N, WITH_SCORES, False)


@_jit
def paged_forward_kernel(
    Q, KC, VC, ORDER, KN, VN, COS, SIN, OUT, BIAS, EMA,
    stride_qb, stride_qh, stride_qm,
    stride_kcb, stride_kch, stride_kcn,
    stride_vcb, stride_vch, stride_vcn,
    stride_knb, stride_knh, stride_knn,
    stride_vnb, stride_vnh, stride_vnn,
    stride_cs,
    stride_ob, stride_oh, stride_om,
    n_q, n_past, n_heads, group, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, WITH_SCORES: tl.constexpr,
):
    """Pass 1 straight from the cache (`_forward`, PAGED)."""
    _forward(Q, KC, VC, ORDER, KN, VN, COS, SIN, OUT, BIAS, EMA, stride_qb, stride_qh, stride_qm, stride_kcb,
             stride_kch, stride_kcn, stride_vcb, stride_vch, stride_vcn, stride_knb, stride_knh, stride_knn,
             stride_vnb, stride_vnh, stride_vnn, stride_cs, stride_ob, stride_oh, stride_om,
             n_q, n_past, 0, n_heads, group, qk_scale, HEAD_DIM, BLOCK_M, BLOCK_N, WITH_SCORES, True)


@_jit
def _column_block(k1, k2, q_base, bias_base, cols, rows, offs_h, n_q, n_past, stride_qm, qk_scale,
                  HALF: tl.constexpr, CAUSAL: tl.constexpr):
    """PAGED: w_m p(m, j) = exp2(s2 + BIAS_m) for key columns `cols` (rotated halves k1, k2 [BLOCK_N, D/2]) and
    query rows `rows`: [BLOCK_N, BLOCK_M]."""
    p_qt = q_base + rows[None, :] * stride_qm + offs_h[:, None]  # [D/2, BLOCK_M]
    q1t = tl.load(p_qt, mask=rows[None, :] < n_q, other=0.0)
    q2t = tl.load(p_qt + HALF, mask=rows[None, :] < n_q, other=0.0)
    bias = tl.load(bias_base + rows, mask=rows < n_q, other=float("-inf"))  # padding rows: exp2 -> 0
    p = tl.exp2(tl.dot(k2, q2t, tl.dot(k1, q1t)) * qk_scale + bias[None, :])
    if CAUSAL:
        p = tl.where(cols[:, None] <= rows[None, :] + n_past, p, 0.0)
    return p


@_jit
def _scores(
    Q, K, ORDER, KN, COS, SIN, BIAS, SCORES,
    stride_qb, stride_qh, stride_qm,
    stride_kb, stride_kh, stride_kn,
    stride_knb, stride_knh, stride_knn,
    stride_cs,
    n_q, n_past, n_k, n_kv_heads, n_sinks, qk_scale,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    REDUCE_MAX: tl.constexpr, PAGED: tl.constexpr,
):
    """Pass 2: one program owns BLOCK_N key columns of one KV head (loaded, and rotated when PAGED, once) and walks
    the queries of each of its GROUP query heads, summing w_m p(m, j) = exp2(s2 + BIAS_m) per key (no atomics);
    then max or mean over the heads. Column j is key j of the attention order: the cache's slot ORDER[j] below
    n_past, the chunk's key j - n_past after (PAGED), or K's row j (unpaged)."""
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // n_kv_heads).to(tl.int64)
    kvh = (pid_bh % n_kv_heads).to(tl.int64)
    HALF: tl.constexpr = HEAD_DIM // 2
    if PAGED:
        n_k = n_past + n_q
    else:
        n_past = n_k - n_q
    start_n = n_sinks + pid_n * BLOCK_N  # sink columns get no score: skip them
    cols = start_n + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    if PAGED:
        offs_q = tl.arange(0, HALF)
        c_ok, in_c, is_new, slot = key_sources(ORDER, cols, n_past, n_k, False)
        k1, k2 = load_rotated_either(  # [BLOCK_N, D/2], reused for every query block
            K + b * stride_kb + kvh * stride_kh + slot[:, None] * stride_kn + offs_q[None, :],
            KN + b * stride_knb + kvh * stride_knh + (cols - n_past)[:, None] * stride_knn + offs_q[None, :],
            COS + cols[:, None] * stride_cs + offs_q[None, :], SIN + cols[:, None] * stride_cs + offs_q[None, :],
            in_c[:, None], is_new[:, None], HALF)
    else:
        offs_q = tl.arange(0, HEAD_DIM)
        k1 = tl.load(K + b * stride_kb + kvh * stride_kh + cols[:, None] * stride_kn + offs_q[None, :],
                     mask=cols[:, None] < n_k, other=0.0)  # [BLOCK_N, D], reused for every query block
    # query blocks that straddle the diagonal need the causal mask; earlier ones see none of these keys
    m_begin = (tl.maximum(start_n - n_past, 0) // BLOCK_M) * BLOCK_M
    m_diag = tl.cdiv(tl.minimum(tl.maximum(start_n + BLOCK_N - n_past, 0), n_q), BLOCK_M) * BLOCK_M
    result = tl.zeros([BLOCK_N], tl.float32)  # column sums are >= 0, so 0 is the identity of max too
    for g in range(GROUP):
        h = kvh * GROUP + g
        q_base = Q + b * stride_qb + h * stride_qh
        bias_base = BIAS + (b * n_kv_heads * GROUP + h) * n_q
        acc = tl.zeros([BLOCK_N, BLOCK_M], tl.float32)
        for m0 in range(m_begin, m_diag, BLOCK_M):
            if PAGED:
                acc += _column_block(k1, k2, q_base, bias_base, cols, m0 + offs_m, offs_q, n_q, n_past, stride_qm,
                                     qk_scale, HALF, True)
            else:
                rows = m0 + offs_m
                qt = tl.load(q_base + rows[None, :] * stride_qm + offs_q[:, None], mask=rows[None, :] < n_q,
                             other=0.0)
                bias = tl.load(bias_base + rows, mask=rows < n_q, other=float("-inf"))
                s = tl.dot(k1, qt) * qk_scale + bias[None, :]  # [BLOCK_N, BLOCK_M]
                acc += tl.where(cols[:, None] <= rows[None, :] + n_past, tl.exp2(s), 0.0)
        for m0 in range(m_diag, n_q, BLOCK_M):
            if PAGED:
                acc += _column_block(k1, k2, q_base, bias_base, cols, m0 + offs_m, offs_q, n_q, n_past, stride_qm,
                                     qk_scale, HALF, False)
            else:
                rows = m0 + offs_m
                qt = tl.load(q_base + rows[None, :] * stride_qm + offs_q[:, None], mask=rows[None, :] < n_q,
                             other=0.0)
                bias = tl.load(bias_base + rows, mask=rows < n_q, other=float("-inf"))  # padding rows: exp2 -> 0
                acc += tl.exp2(tl.dot(k1, qt) * qk_scale + bias[None, :])
        col = tl.sum(acc, 1)
        if REDUCE_MAX:
            result = tl.maximum(result, col)
        else:
            result += col
    if not REDUCE_MAX:
        result = result / GROUP
    if not PAGED:
        c_ok = cols < n_k
    tl.store(SCORES + pid_bh.to(tl.int64) * (n_k - n_sinks) + (cols - n_sinks), result, mask=c_ok)

@_jit
def scores_kernel(
    Q, K, BIAS, SCORES,
    stride_qb, stride_qh, stride_qm,
    stride_kb, stride_kh, stride_kn,
    n_q, n_k, n_kv_heads, n_sinks, qk_scale,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    REDUCE_MAX: tl.constexpr,
):
    """Pass 2 over keys in attention order (`_scores`, unpaged)."""
    _scores(Q, K, K, K, K, K, BIAS, SCORES, stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn,
            0, 0, 0, 0, n_q, 0, n_k, n_kv_heads, n_sinks, qk_scale, GROUP, HEAD_DIM, BLOCK_M, BLOCK_N, REDUCE_MAX,
            False)


@_jit
def paged_scores_kernel(
    Q, KC, ORDER, KN, COS, SIN, BIAS, SCORES,
    stride_qb, stride_qh, stride_qm,
    stride_kcb, stride_kch, stride_kcn,
    stride_knb, stride_knh, stride_knn,
    stride_cs,
    n_q, n_past, n_kv_heads, n_sinks, qk_scale,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    REDUCE_MAX: tl.constexpr,
):
    """Pass 2 straight from the cache (`_scores`, PAGED)."""
    _scores(Q, KC, ORDER, KN, COS, SIN, BIAS, SCORES, stride_qb, stride_qh, stride_qm, stride_kcb, stride_kch,
            stride_kcn, stride_knb, stride_knh, stride_knn, stride_cs, n_q, n_past, 0, n_kv_heads, n_sinks, qk_scale,
            GROUP, HEAD_DIM, BLOCK_M, BLOCK_N, REDUCE_MAX, True)


@_jit
def gather_rotate_kernel(
    KC, VC, ORDER, KN, VN, COS, SIN, K_OUT, V_OUT,
    stride_kcb, stride_kch, stride_kcn,
    stride_vcb, stride_vch, stride_vcn,
    stride_knb, stride_knh, stride_knn,
    stride_vnb, stride_vnh, stride_vnn,
    stride_cs,
    n_past, n_k, n_kv_heads,
    HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """`materialise` (kernels/paged_attention.py) in one pass: BLOCK_N rows of [cache slots in ORDER | chunk] of
    one KV head, keys rotated at their row's position, written to contiguous K_OUT, V_OUT [B, Hkv, n_k, D]."""
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1).to(tl.int64)
    b = pid_bh // n_kv_heads
    kvh = pid_bh % n_kv_heads
    HALF: tl.constexpr = HEAD_DIM // 2
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_h = tl.arange(0, HALF)
    offs_d = tl.arange(0, HEAD_DIM)
    c_ok, in_c, is_new, slot = key_sources(ORDER, cols, n_past, n_k, False)
    k1, k2 = load_rotated_either(
        KC + b * stride_kcb + kvh * stride_kch + slot[:, None] * stride_kcn + offs_h[None, :],
        KN + b * stride_knb + kvh * stride_knh + (cols - n_past)[:, None] * stride_knn + offs_h[None, :],
        COS + cols[:, None] * stride_cs + offs_h[None, :], SIN + cols[:, None] * stride_cs + offs_h[None, :],
        in_c[:, None], is_new[:, None], HALF)
    row = pid_bh * n_k + cols
    tl.store(K_OUT + row[:, None] * HEAD_DIM + offs_h[None, :], k1, mask=c_ok[:, None])
    tl.store(K_OUT + row[:, None] * HEAD_DIM + HALF + offs_h[None, :], k2, mask=c_ok[:, None])
    v = load_either(VC + b * stride_vcb + kvh * stride_vch + slot[:, None] * stride_vcn + offs_d[None, :],
                    VN + b * stride_vnb + kvh * stride_vnh + (cols - n_past)[:, None] * stride_vnn + offs_d[None, :],
                    in_c[:, None], is_new[:, None])
    tl.store(V_OUT + row[:, None] * HEAD_DIM + offs_d[None, :], v, mask=c_ok[:, None])
