"""Triton kernels of the fused sign optimizers (imported lazily: needs triton).

The per-element math follows ``csrc/core/sign_math.h`` operation for operation (NOTE: [no
contraction]: every product and sum is a separate fp32 op and the launcher passes
``enable_fp_fusion=False``). Storage conversions are done by hand on the bit patterns,
exactly as ``bf16_bits_rne`` / ``bf16_bits_sr`` / ``fp16_bits_rne`` do, so the compiled GPU
path and the CPU interpreter (``TRITON_INTERPRET=1``, whose fp32->bf16 cast truncates)
write the same bits.

Every kernel reads its tensors through a device table of raw addresses (int64) and casts
them with ``.to(tl.pointer_type(...))``: one launch covers any number of tensors. The
interpreter runs on CPU tensors whose addresses are real host addresses, so the same
kernels run there unchanged.
"""

from __future__ import annotations

import triton
import triton.language as tl

INTERPRETED = bool(triton.knobs.runtime.interpret)

# Storage dtype codes (constexpr arguments).
DT_F32 = tl.constexpr(0)
DT_BF16 = tl.constexpr(1)
DT_F16 = tl.constexpr(2)
DT_I16 = tl.constexpr(3)

# Algorithm codes (constexpr ALGO), as csrc/core/sign_math.h `Algo`.
ALGO_LION = tl.constexpr(0)
ALGO_TIGER = tl.constexpr(1)
ALGO_SIMBA = tl.constexpr(2)

# Tiger roles (sign_math.h TigerRole).
ROLE_GAIN = tl.constexpr(1)
ROLE_EMBEDDING = tl.constexpr(2)
ROLE_MATRIX = tl.constexpr(3)

# Fields of one row of the tensor table (int64), see _launch.Plan.
F_PARAM = tl.constexpr(0)      # address of θ
F_GRAD = tl.constexpr(1)       # address of g
F_STATE = tl.constexpr(2)      # address of m (or Simba's int16 counters)
F_STEP = tl.constexpr(3)       # address of the 0-dim int64 step t
F_NUMEL = tl.constexpr(4)
F_SEED = tl.constexpr(5)       # SR tensor seed (uint32 value)
F_ROLE = tl.constexpr(6)       # Tiger role
F_ROWLEN = tl.constexpr(7)     # Tiger stats row length (embedding: last dim)
F_NROWS = tl.constexpr(8)      # Tiger stats rows
F_SLOT = tl.constexpr(9)       # Tiger first stats slot
F_GIVEN_NAN = tl.constexpr(10)   # Tiger: index of the given NaN count in `stats`, or -1
F_GIVEN_SUMSQ = tl.constexpr(11)  # Tiger: index of the given sum(s) of squares, or -1
F_GIVEN_N = tl.constexpr(12)     # Tiger: n of the RMS of the given sums
NFIELDS = tl.constexpr(13)

# NOTE: [stochastic rounding bits] salts 0x9E3779B9 * (stream + 1), wrapped to uint32.
SALT_PARAM = tl.constexpr(0x9E3779B9)
SALT_STATE = tl.constexpr((0x9E3779B9 * 2) & 0xFFFFFFFF)


# ------------------------------------------------------------------ bits and conversions
@triton.jit
def _mix32(x):
    # lowbias32, uint32 wrapping arithmetic.
    x = x ^ (x >> 16)
    x = x * 0x7FEB352D
    x = x ^ (x >> 15)
    x = x * 0x846CA68B
    x = x ^ (x >> 16)
    return x


@triton.jit
def _sr_key(seed, step, SALT: tl.constexpr):
    # mix32(seed ^ mix32(step_lo + 0x9E3779B9 * (stream + 1)))
    step_lo = step.to(tl.uint32)
    return _mix32(seed ^ _mix32(step_lo + SALT))


@triton.jit
def _sr_bits(key, idx):
    lo = idx.to(tl.uint32)
    hi = (idx >> 32).to(tl.uint32)
    return _mix32(key ^ _mix32(lo ^ (hi * 0x85EBCA6B)))


@triton.jit
def _bf16_bits(x, r, SR: tl.constexpr):
    # bf16_bits_rne / bf16_bits_sr: returns the 16 bits in a uint32.
    u = x.to(tl.uint32, bitcast=True)
    if SR:
        rounded = (u + (r & 0xFFFF)) >> 16
    else:
        rounded = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
    nan = ((u >> 16) & 0x8000) | 0x7FC0
    return tl.where((u & 0x7FFFFFFF) > 0x7F800000, nan, rounded)


@triton.jit
def _fp16_bits(x):
    # fp16_bits_rne: round to nearest even, overflow to Inf, exact subnormals.
    u = x.to(tl.uint32, bitcast=True)
    sign = (u >> 16) & 0x8000
    a = u & 0x7FFFFFFF
    nan = sign | 0x7E00
    inf = sign | 0x7C00
    normal = (a - 0x38000000 + 0xFFF + ((a >> 13) & 1)) >> 13
    sub_f = a.to(tl.float32, bitcast=True) + 0.5
    sub = sub_f.to(tl.uint32, bitcast=True) - 0x3F000000
    mag = tl.where(a < 0x38800000, sub, normal)
    mag = tl.where(a >= 0x477FF000, 0x7C00, mag)
    return tl.where(a > 0x7F800000, nan, tl.where(a == 0x7F800000, inf, sign | mag))


@triton.jit
def _load_f32(addr, offs, mask, DT: tl.constexpr, ALIGNED: tl.constexpr):
    if ALIGNED:
        addr = tl.multiple_of(addr, 16)
    if DT == DT_F32:
        x = tl.load(addr.to(tl.pointer_type(tl.float32)) + offs, mask=mask, other=0.0)
    elif DT == DT_BF16:
        b = tl.load(addr.to(tl.pointer_type(tl.uint16)) + offs, mask=mask, other=0)
        x = (b.to(tl.uint32) << 16).to(tl.float32, bitcast=True)
    else:
        x = tl.load(addr.to(tl.pointer_type(tl.float16)) + offs, mask=mask, other=0.0).to(tl.float32)
    return x


@triton.jit
def _store_f32(addr, offs, x, mask, key, DT: tl.constexpr, SR: tl.constexpr, ALIGNED: tl.constexpr):
    # sign_math.h store(): fp32 exact, bf16 RNE or SR, fp16 RNE.
    if ALIGNED:
        addr = tl.multiple_of(addr, 16)
    if DT == DT_F32:
        tl.store(addr.to(tl.pointer_type(tl.float32)) + offs, x, mask=mask)
    elif DT == DT_BF16:
        if SR:
            bits = _bf16_bits(x, _sr_bits(key, offs), True)
        else:
            bits = _bf16_bits(x, 0, False)
        tl.store(addr.to(tl.pointer_type(tl.uint16)) + offs, bits.to(tl.uint16), mask=mask)
    else:
        tl.store(addr.to(tl.pointer_type(tl.uint16)) + offs, _fp16_bits(x).to(tl.uint16), mask=mask)


@triton.jit
def _sign(x):
    # NOTE: [sign]: +1, -1, and 0 for ±0 and NaN.
    return (x > 0).to(tl.float32) - (x < 0).to(tl.float32)


@triton.jit
def _grad(g_addr, offs, mask, scale_ptr, G_DT: tl.constexpr, HAS_SCALE: tl.constexpr, ALIGNED: tl.constexpr):
    g = _load_f32(g_addr, offs, mask, G_DT, ALIGNED)
    if HAS_SCALE:
        g = tl.math.div_rn(g, tl.load(scale_ptr).to(tl.float32))
    return g


# ------------------------------------------------------------------ the update kernel
@triton.jit(do_not_specialize=["k", "window", "threshold"])
def sign_step_kernel(
    tensors, blocks,                       # int64 tables: [n, NFIELDS], [n_blocks, 2] (tensor, start)
    lr, lr_t, scale_ptr, found_ptr,        # lr (float) unless HAS_LR_T; optional 0-dim fp32 tensors
    weight_decay, beta1, beta2, shrink,    # Lion: beta1, beta2; Tiger: beta1 = beta, shrink
    k, window, threshold,                  # Tiger: grad_accum_steps; Simba: W, T
    t_nan, t_rms, row_rms,                 # Tiger stats: per-tensor NaN flag, RMS, per-row RMS
    ALGO: tl.constexpr, P_DT: tl.constexpr, G_DT: tl.constexpr, M_DT: tl.constexpr,
    HAS_LR_T: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_FOUND: tl.constexpr,
    SR: tl.constexpr, ALIGNED: tl.constexpr, BLOCK: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    ti = tl.load(blocks + 2 * pid)
    start = tl.load(blocks + 2 * pid + 1)
    if ALIGNED:
        start = tl.multiple_of(start, BLOCK)
    row = tensors + ti * NFIELDS
    p_addr = tl.load(row + F_PARAM)
    g_addr = tl.load(row + F_GRAD)
    m_addr = tl.load(row + F_STATE)
    numel = tl.load(row + F_NUMEL)
    step = tl.load(tl.load(row + F_STEP).to(tl.pointer_type(tl.int64)))
    seed = tl.load(row + F_SEED).to(tl.uint32)

    offs = start + tl.arange(0, BLOCK).to(tl.int64)
    mask = offs < numel
    if HAS_FOUND:
        # GradScaler skipped this step: touch nothing (NaN counts as found).
        # NOTE: [scalar masks] a scalar condition enters a mask as a bound on the offsets
        # (offs < where(cond, numel, 0)): the interpreter mis-types `tensor & scalar_bool`.
        mask = offs < tl.where(tl.load(found_ptr).to(tl.float32) == 0.0, numel, 0)

    if HAS_LR_T:
        lr_ = tl.load(lr_t).to(tl.float32)
    else:
        lr_ = tl.cast(lr, tl.float32)
    wd = tl.cast(weight_decay, tl.float32)
    key_p = _sr_key(seed, step, SALT_PARAM)
    key_m = _sr_key(seed, step, SALT_STATE)

    p = _load_f32(p_addr, offs, mask, P_DT, ALIGNED)
    g = _grad(g_addr, offs, mask, scale_ptr, G_DT, HAS_SCALE, ALIGNED)

    if ALGO == ALGO_LION:
        b1 = tl.cast(beta1, tl.float32)
        b2 = tl.cast(beta2, tl.float32)
        m = _load_f32(m_addr, offs, mask, M_DT, ALIGNED)
        decay = 1.0 - lr_ * wd
        c = b1 * m + (1.0 - b1) * g
        p_new = p * decay - lr_ * _sign(c)
        m_new = b2 * m + (1.0 - b2) * g
        _store_f32(p_addr, offs, p_new, mask, key_p, P_DT, SR, ALIGNED)
        _store_f32(m_addr, offs, m_new, mask, key_m, M_DT, SR, ALIGNED)
    elif ALGO == ALGO_TIGER:
        beta = tl.cast(beta1, tl.float32)
        role = tl.load(row + F_ROLE)
        kk = tl.cast(k, tl.int64)
        b1 = tl.where(step % kk == 0, beta, 1.0)
        coef = tl.math.div_rn(1.0 - beta, kk.to(tl.float32))
        update = ((step + 1) % kk) == 0
        elementwise = role < ROLE_EMBEDDING
        has_nan = tl.load(t_nan + ti) != 0
        no_nan = tl.load(t_nan + ti) == 0
        m = _load_f32(m_addr, offs, mask, M_DT, ALIGNED)
        m_new = b1 * m + coef * g
        # lr_p: 0.5 lr (element-wise roles), lr * RMS(tensor) or lr * RMS(row).
        if role == ROLE_EMBEDDING:
            row_len = tl.load(row + F_ROWLEN)
            slot = tl.load(row + F_SLOT)
            rms = tl.load(row_rms + slot + offs // row_len, mask=mask, other=0.0)
        else:
            rms = tl.zeros([BLOCK], dtype=tl.float32) + tl.load(t_rms + ti)
        lr_p = tl.where(elementwise, 0.5 * lr_, lr_ * rms)
        wd_p = tl.where(elementwise, 0.0, wd)
        p_upd = p - lr_p * (_sign(m_new) + wd_p * p)
        # NaN guard: p = (p - c) s + c, m unchanged.
        centre = tl.where(role == ROLE_GAIN, 1.0, 0.0)
        p_shrunk = (p - centre) * tl.cast(shrink, tl.float32) + centre
        p_new = tl.where(has_nan, p_shrunk, p_upd)
        p_mask = mask & (offs < tl.where(has_nan | update, numel, 0))  # NOTE: [scalar masks]
        m_mask = mask & (offs < tl.where(no_nan, numel, 0))
        _store_f32(p_addr, offs, p_new, p_mask, key_p, P_DT, SR, ALIGNED)
        _store_f32(m_addr, offs, m_new, m_mask, key_m, M_DT, SR, ALIGNED)
    else:
        cnt_ptr = m_addr.to(tl.pointer_type(tl.int16))
        cnt = tl.load(cnt_ptr + offs, mask=mask, other=0).to(tl.int32)
        win = tl.cast(window, tl.int32)
        sg = _sign(g)
        mag = tl.where(cnt < 0, -cnt, cnt)
        u = tl.where(mag > tl.cast(threshold, tl.int32), ((cnt > 0).to(tl.int32) - (cnt < 0).to(tl.int32)).to(tl.float32), sg)
        decay = 1.0 - lr_ * wd
        p_new = p * decay
        p_new = p_new - lr_ * u
        n = cnt + sg.to(tl.int32)
        n = tl.where(n > win, win, n)
        n = tl.where(n < -win, -win, n)
        _store_f32(p_addr, offs, p_new, mask, key_p, P_DT, SR, ALIGNED)
        tl.store(cnt_ptr + offs, n.to(tl.int16), mask=mask)


# ------------------------------------------------------------------ Tiger statistics
@triton.jit(do_not_specialize=["k"])
def tiger_rows_kernel(
    tensors, tasks,                        # tasks: [n_tasks, 2] (tensor, first row)
    scale_ptr, found_ptr, k,
    row_sumsq, row_nan,                    # per stats slot: fp64 sum of θ², int32 NaN count of g
    G_DT: tl.constexpr, P_DT: tl.constexpr, HAS_SCALE: tl.constexpr,
    ROWS: tl.constexpr, COLS: tl.constexpr,
):
    """Pass 1: per stats row, the fp64 sum of squares of θ (only where an update with an RMS
    role happens this call) and the number of NaNs in g / grad_scale."""
    pid = tl.program_id(0).to(tl.int64)
    ti = tl.load(tasks + 2 * pid)
    row0 = tl.load(tasks + 2 * pid + 1)
    row = tensors + ti * NFIELDS
    p_addr = tl.load(row + F_PARAM)
    g_addr = tl.load(row + F_GRAD)
    numel = tl.load(row + F_NUMEL)
    row_len = tl.load(row + F_ROWLEN)
    nrows = tl.load(row + F_NROWS)
    slot = tl.load(row + F_SLOT)
    role = tl.load(row + F_ROLE)
    step = tl.load(tl.load(row + F_STEP).to(tl.pointer_type(tl.int64)))
    kk = tl.cast(k, tl.int64)
    # Given statistics (NOTE: [Tiger statistics input]) are not computed here: θ or g unread.
    need_sq = (((step + 1) % kk) == 0) & (role >= ROLE_EMBEDDING) & (tl.load(row + F_GIVEN_SUMSQ) < 0)
    sq_limit = tl.where(need_sq, numel, 0)  # NOTE: [scalar masks]
    nan_limit = tl.where(tl.load(row + F_GIVEN_NAN) < 0, numel, 0)

    rows = row0 + tl.arange(0, ROWS).to(tl.int64)
    row_ok = rows < nrows
    acc_sq = tl.zeros([ROWS], dtype=tl.float64)
    acc_nan = tl.zeros([ROWS], dtype=tl.int32)
    for c0 in range(0, row_len, COLS):
        cols = c0 + tl.arange(0, COLS).to(tl.int64)
        idx = rows[:, None] * row_len + cols[None, :]
        msk = row_ok[:, None] & (cols[None, :] < row_len) & (idx < numel)
        g = _grad(g_addr, idx, msk & (idx < nan_limit), scale_ptr, G_DT, HAS_SCALE, False)
        acc_nan += tl.sum((g != g).to(tl.int32), axis=1)
        x = _load_f32(p_addr, idx, msk & (idx < sq_limit), P_DT, False).to(tl.float64)
        acc_sq += tl.sum(x * x, axis=1)
    tl.store(row_sumsq + slot + rows, acc_sq, mask=row_ok)
    tl.store(row_nan + slot + rows, acc_nan, mask=row_ok)


@triton.jit
def tiger_finish_kernel(
    tensors, row_sumsq, row_nan,
    t_nan, t_rms, row_rms,
    stats,                                 # fp64 given statistics (NOTE: [Tiger statistics input])
    BLOCK: tl.constexpr,
):
    """Pass 2, one program per tensor, fixed order (deterministic): NaN flag, whole-tensor
    RMS (matrix role) and per-row RMS (embedding role), rms = fp32(sqrt(sumsq / n)) in fp64.
    Where the table gives an index into ``stats`` (sharded tensors), the given NaN count and
    sums of squares of the whole tensor replace this call's own."""
    ti = tl.program_id(0).to(tl.int64)
    row = tensors + ti * NFIELDS
    numel = tl.load(row + F_NUMEL)
    row_len = tl.load(row + F_ROWLEN)
    nrows = tl.load(row + F_NROWS)
    slot = tl.load(row + F_SLOT)
    role = tl.load(row + F_ROLE)
    at_nan = tl.load(row + F_GIVEN_NAN)
    at_sq = tl.load(row + F_GIVEN_SUMSQ)
    given_n = tl.load(row + F_GIVEN_N).to(tl.float64)
    given_rows = (at_sq >= 0) & (role == ROLE_EMBEDDING)
    row_n = tl.where(given_rows, given_n, row_len.to(tl.float64))
    nan = tl.zeros([BLOCK], dtype=tl.int32)
    sq = tl.zeros([BLOCK], dtype=tl.float64)
    for r0 in range(0, nrows, BLOCK):
        r = r0 + tl.arange(0, BLOCK).to(tl.int64)
        ok = r < nrows
        nan += tl.load(row_nan + slot + r, mask=ok, other=0)
        s = tl.load(row_sumsq + slot + r, mask=ok, other=0.0)
        sq += s
        # NOTE: [scalar masks]
        s_given = tl.load(stats + tl.maximum(at_sq, 0) + r, mask=r < tl.where(given_rows, nrows, 0), other=0.0)
        s = tl.where(given_rows, s_given, s)
        rr = tl.sqrt(s / row_n).to(tl.float32)
        tl.store(row_rms + slot + r, rr, mask=r < tl.where(role == ROLE_EMBEDDING, nrows, 0))
    own_nan = tl.sum(nan, axis=0) > 0
    given_nan = tl.load(stats + tl.maximum(at_nan, 0)) != 0.0
    tl.store(t_nan + ti, tl.where(at_nan >= 0, given_nan, own_nan).to(tl.int32))
    total = tl.where(at_sq >= 0, tl.load(stats + tl.maximum(at_sq, 0)), tl.sum(sq, axis=0))
    n = tl.where(at_sq >= 0, given_n, tl.maximum(numel, 1).to(tl.float64))
    tl.store(t_rms + ti, tl.sqrt(total / n).to(tl.float32))
