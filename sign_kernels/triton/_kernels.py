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
    return _sr_bits_lohi(key, idx.to(tl.uint32), (idx >> 32).to(tl.uint32))


@triton.jit
def _sr_bits_lohi(key, lo, hi):
    # sr_bits of the element index hi * 2**32 + lo (both uint32).
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


# ------------------------------------------------------------------ typed pointers
# NOTE: [vector hints] 16-byte loads and stores need the compiler to know that the *typed
# pointer* of every access is 16-byte aligned and that each thread's run of elements is
# contiguous: a `tl.multiple_of` on the int64 address before `.to(pointer_type)` is lost in
# the int->pointer cast. So the kernels cast first, hint the pointer (ALIGNED: the launcher
# checked every address), advance it by the block start (a multiple of BLOCK, itself hinted)
# and index it with an int32 `tl.arange`: the per-element offsets are then provably
# contiguous from an aligned base, and they are 32-bit (an int64 offset per element costs
# two registers each). Full blocks take an unmasked path (a mask of unknown alignment, from
# a numel of unknown alignment, would split the vectors).
@triton.jit
def _typed_ptr(addr, DT: tl.constexpr, ALIGNED: tl.constexpr):
    """The storage pointer of a table address: fp32, int16, or bf16 / fp16 as raw 16 bits
    (stores write the bit patterns of _bf16_bits / _fp16_bits)."""
    if DT == DT_F32:
        ptr = addr.to(tl.pointer_type(tl.float32))
    elif DT == DT_I16:
        ptr = addr.to(tl.pointer_type(tl.int16))
    else:
        ptr = addr.to(tl.pointer_type(tl.uint16))
    if ALIGNED:
        ptr = tl.multiple_of(ptr, 16)
    return ptr


@triton.jit
def _load(ptrs, mask):
    # mask None: the unmasked full-block path (`other` is only allowed with a mask).
    if mask is None:
        x = tl.load(ptrs)
    else:
        x = tl.load(ptrs, mask=mask, other=0)
    return x


@triton.jit
def _ld(ptr, offs, mask, DT: tl.constexpr):
    """fp32 value of the storage at ptr + offs (ptr from _typed_ptr); mask None: unmasked."""
    if DT == DT_F32:
        x = _load(ptr + offs, mask)
    elif DT == DT_BF16:
        b = _load(ptr + offs, mask)
        x = (b.to(tl.uint32) << 16).to(tl.float32, bitcast=True)
    else:
        x = _load(ptr + offs, mask).to(tl.float16, bitcast=True).to(tl.float32)
    return x


@triton.jit
def _st(ptr, offs, x, mask, key, hi, lo0, DT: tl.constexpr, SR: tl.constexpr):
    # sign_math.h store(): fp32 exact, bf16 RNE or SR, fp16 RNE. The SR bits take the
    # element index hi * 2**32 + lo0 + offs (the launcher's blocks never cross 2**32).
    if DT == DT_F32:
        tl.store(ptr + offs, x, mask=mask)
    elif DT == DT_BF16:
        if SR:
            bits = _bf16_bits(x, _sr_bits_lohi(key, lo0 + offs.to(tl.uint32), hi), True)
        else:
            bits = _bf16_bits(x, 0, False)
        tl.store(ptr + offs, bits.to(tl.uint16), mask=mask)
    else:
        tl.store(ptr + offs, _fp16_bits(x).to(tl.uint16), mask=mask)


@triton.jit
def _ld_grad(g_ptr, offs, mask, scale_ptr, G_DT: tl.constexpr, HAS_SCALE: tl.constexpr):
    g = _ld(g_ptr, offs, mask, G_DT)
    if HAS_SCALE:
        g = tl.math.div_rn(g, tl.load(scale_ptr).to(tl.float32))
    return g


@triton.jit
def _sign(x):
    # NOTE: [sign]: +1, -1, and 0 for ±0 and NaN.
    return (x > 0).to(tl.float32) - (x < 0).to(tl.float32)


# ------------------------------------------------------------------ the update kernel
@triton.jit
def _update_block(
    p_ptr, g_ptr, m_ptr, offs, mask, hi, lo0, step, ti, start, row,
    lr_, scale_ptr, weight_decay, beta1, beta2, shrink, k, window, threshold,
    t_nan, t_rms, row_rms,
    ALGO: tl.constexpr, P_DT: tl.constexpr, G_DT: tl.constexpr, M_DT: tl.constexpr,
    HAS_SCALE: tl.constexpr, SR: tl.constexpr, BLOCK: tl.constexpr,
):
    """One block of one tensor: pointers already advanced to the block start, offs an int32
    arange, mask None (full block) or the tail mask."""
    seed = tl.load(row + F_SEED).to(tl.uint32)
    wd = tl.cast(weight_decay, tl.float32)
    p = _ld(p_ptr, offs, mask, P_DT)

    if ALGO == ALGO_LION:
        g = _ld_grad(g_ptr, offs, mask, scale_ptr, G_DT, HAS_SCALE)
        b1 = tl.cast(beta1, tl.float32)
        b2 = tl.cast(beta2, tl.float32)
        m = _ld(m_ptr, offs, mask, M_DT)
        decay = 1.0 - lr_ * wd
        c = b1 * m + (1.0 - b1) * g
        p_new = p * decay - lr_ * _sign(c)
        m_new = b2 * m + (1.0 - b2) * g
        _st(p_ptr, offs, p_new, mask, _sr_key(seed, step, SALT_PARAM), hi, lo0, P_DT, SR)
        _st(m_ptr, offs, m_new, mask, _sr_key(seed, step, SALT_STATE), hi, lo0, M_DT, SR)
    elif ALGO == ALGO_TIGER:
        # NOTE: [tiger registers] each value is computed in the branch that stores it, so the
        # shrunk θ, the updated θ and the row RMS are never live at the same time.
        beta = tl.cast(beta1, tl.float32)
        role = tl.load(row + F_ROLE)
        kk = tl.cast(k, tl.int64)
        if tl.load(t_nan + ti) != 0:
            # NaN guard: p = (p - c) s + c, m unchanged.
            centre = tl.where(role == ROLE_GAIN, 1.0, 0.0)
            p_shrunk = (p - centre) * tl.cast(shrink, tl.float32) + centre
            _st(p_ptr, offs, p_shrunk, mask, _sr_key(seed, step, SALT_PARAM), hi, lo0, P_DT, SR)
        else:
            b1 = tl.where(step % kk == 0, beta, 1.0)
            coef = tl.math.div_rn(1.0 - beta, kk.to(tl.float32))
            g = _ld_grad(g_ptr, offs, mask, scale_ptr, G_DT, HAS_SCALE)
            m = _ld(m_ptr, offs, mask, M_DT)
            m_new = b1 * m + coef * g
            if ((step + 1) % kk) == 0:
                # lr_p: 0.5 lr (element-wise roles), lr * RMS(tensor) or lr * RMS(row).
                elementwise = role < ROLE_EMBEDDING
                if role == ROLE_EMBEDDING:
                    # Row of each element: q0 + (r0 + offs) // row_len, with q0, r0 the block
                    # start's row and column; int32 (a row of >= BLOCK elements is crossed at
                    # most once in a block).
                    row_len = tl.load(row + F_ROWLEN)
                    q0 = start // row_len
                    r0 = start - q0 * row_len
                    if row_len >= BLOCK:
                        ri = (offs >= tl.minimum(row_len - r0, BLOCK).to(tl.int32)).to(tl.int32)
                    else:
                        ri = (r0.to(tl.int32) + offs) // row_len.to(tl.int32)
                    rms = _load(row_rms + tl.load(row + F_SLOT) + q0 + ri, mask)
                else:
                    rms = tl.zeros([BLOCK], dtype=tl.float32) + tl.load(t_rms + ti)
                lr_p = tl.where(elementwise, 0.5 * lr_, lr_ * rms)
                wd_p = tl.where(elementwise, 0.0, wd)
                p_upd = p - lr_p * (_sign(m_new) + wd_p * p)
                _st(p_ptr, offs, p_upd, mask, _sr_key(seed, step, SALT_PARAM), hi, lo0, P_DT, SR)
            _st(m_ptr, offs, m_new, mask, _sr_key(seed, step, SALT_STATE), hi, lo0, M_DT, SR)
    else:
        g = _ld_grad(g_ptr, offs, mask, scale_ptr, G_DT, HAS_SCALE)
        cnt = _load(m_ptr + offs, mask).to(tl.int32)
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
        _st(p_ptr, offs, p_new, mask, _sr_key(seed, step, SALT_PARAM), hi, lo0, P_DT, SR)
        tl.store(m_ptr + offs, n.to(tl.int16), mask=mask)


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
    numel = tl.load(row + F_NUMEL)
    if HAS_FOUND:
        # GradScaler skipped this step: touch nothing (NaN counts as found).
        numel = tl.where(tl.load(found_ptr).to(tl.float32) == 0.0, numel, 0)
    if start < numel:
        step = tl.load(tl.load(row + F_STEP).to(tl.pointer_type(tl.int64)))
        if HAS_LR_T:
            lr_ = tl.load(lr_t).to(tl.float32)
        else:
            lr_ = tl.cast(lr, tl.float32)
        p_ptr = _typed_ptr(tl.load(row + F_PARAM), P_DT, ALIGNED) + start
        g_ptr = _typed_ptr(tl.load(row + F_GRAD), G_DT, ALIGNED) + start
        m_ptr = _typed_ptr(tl.load(row + F_STATE), M_DT, ALIGNED) + start
        # SR element index = start + offs; a block never crosses a multiple of 2**32.
        hi = (start >> 32).to(tl.uint32)
        lo0 = start.to(tl.uint32)
        offs = tl.arange(0, BLOCK)
        rem = numel - start
        if rem >= BLOCK:
            _update_block(p_ptr, g_ptr, m_ptr, offs, None, hi, lo0, step, ti, start, row,
                          lr_, scale_ptr, weight_decay, beta1, beta2, shrink, k, window, threshold,
                          t_nan, t_rms, row_rms, ALGO, P_DT, G_DT, M_DT, HAS_SCALE, SR, BLOCK)
        else:
            _update_block(p_ptr, g_ptr, m_ptr, offs, offs < rem.to(tl.int32), hi, lo0, step, ti,
                          start, row, lr_, scale_ptr, weight_decay, beta1, beta2, shrink, k,
                          window, threshold, t_nan, t_rms, row_rms, ALGO, P_DT, G_DT, M_DT,
                          HAS_SCALE, SR, BLOCK)


# ------------------------------------------------------------------ Tiger statistics
@triton.jit
def _rows_chunk(g_ptr, p_ptr, offs, mask, scale_ptr, need_sq, acc_sq, acc_nan,
                G_DT: tl.constexpr, P_DT: tl.constexpr, HAS_SCALE: tl.constexpr):
    # One [ROWS, COLS] chunk: NaN count of g / grad_scale per row, and (need_sq) the fp64 sum
    # of θ² per row. θ is read only when needed (a scalar branch, not a mask).
    g = _ld(g_ptr, offs, mask, G_DT)
    if HAS_SCALE:
        g = tl.math.div_rn(g, tl.load(scale_ptr).to(tl.float32))
    acc_nan += tl.sum((g != g).to(tl.int32), axis=1)
    if need_sq:
        x = _ld(p_ptr, offs, mask, P_DT).to(tl.float64)
        acc_sq += tl.sum(x * x, axis=1)
    return acc_sq, acc_nan


@triton.jit(do_not_specialize=["k"])
def tiger_rows_kernel(
    tensors, tasks,                        # tasks: [n_tasks, 2] (tensor, first row)
    scale_ptr, found_ptr, k,
    row_sumsq, row_nan,                    # per stats slot: fp64 sum of θ², int32 NaN count of g
    G_DT: tl.constexpr, P_DT: tl.constexpr, HAS_SCALE: tl.constexpr, ALIGNED: tl.constexpr,
    ROWS: tl.constexpr, COLS: tl.constexpr,
):
    """Pass 1: per stats row, the fp64 sum of squares of θ (only where an update with an RMS
    role happens this call) and the number of NaNs in g / grad_scale."""
    pid = tl.program_id(0).to(tl.int64)
    ti = tl.load(tasks + 2 * pid)
    row0 = tl.multiple_of(tl.load(tasks + 2 * pid + 1), ROWS)  # the launcher's tasks: step ROWS
    row = tensors + ti * NFIELDS
    numel = tl.load(row + F_NUMEL)
    row_len = tl.load(row + F_ROWLEN)
    nrows = tl.load(row + F_NROWS)
    slot = tl.load(row + F_SLOT)
    role = tl.load(row + F_ROLE)
    step = tl.load(tl.load(row + F_STEP).to(tl.pointer_type(tl.int64)))
    kk = tl.cast(k, tl.int64)
    # Given statistics (NOTE: [Tiger statistics input]) are not computed here: θ is not read.
    need_sq = (((step + 1) % kk) == 0) & (role >= ROLE_EMBEDDING) & (tl.load(row + F_GIVEN_SUMSQ) < 0)

    acc_sq = tl.zeros([ROWS], dtype=tl.float64)
    acc_nan = tl.zeros([ROWS], dtype=tl.int32)
    rows = tl.arange(0, ROWS)
    cols = tl.arange(0, COLS)
    # NOTE: [vector hints] Fast path: the tile's ROWS rows all exist and are whole, and the
    # row length is a multiple of 8 elements (16 bytes of 16-bit data), so with the pointers
    # advanced to the tile's first element every row of the tile starts 16-byte aligned
    # (rl below carries that divisibility to the compiler) and full COLS chunks need no mask.
    # Offsets inside the tile are int32 (row_len <= 2**26 keeps ROWS * row_len below 2**31).
    if ((row0 + ROWS) * row_len <= numel) & (row_len % 8 == 0) & (row_len <= 67108864):
        first = row0 * row_len
        g_t = _typed_ptr(tl.load(row + F_GRAD), G_DT, ALIGNED) + first
        p_t = _typed_ptr(tl.load(row + F_PARAM), P_DT, ALIGNED) + first
        rl = (row_len.to(tl.int32) // 8) * 8
        base = rows[:, None] * rl
        n_full = (rl // COLS) * COLS
        for c0 in range(0, n_full, COLS):
            acc_sq, acc_nan = _rows_chunk(g_t, p_t, base + (c0 + cols)[None, :], None, scale_ptr,
                                          need_sq, acc_sq, acc_nan, G_DT, P_DT, HAS_SCALE)
        if n_full < rl:
            tail = n_full + cols
            msk = (rows[:, None] >= 0) & (tail[None, :] < rl)
            acc_sq, acc_nan = _rows_chunk(g_t, p_t, base + tail[None, :], msk, scale_ptr,
                                          need_sq, acc_sq, acc_nan, G_DT, P_DT, HAS_SCALE)
    else:
        # Any other tile (the last of a tensor, odd or huge rows, unaligned addresses): one row
        # at a time in chunks of COLS, the row's start a scalar int64 and the offsets int32, so
        # this path needs fewer registers than the fast one (it is slower, but it only takes the
        # last tile of a tensor, rows of an odd length and huge rows).
        g_b = _typed_ptr(tl.load(row + F_GRAD), G_DT, False)
        p_b = _typed_ptr(tl.load(row + F_PARAM), P_DT, False)
        lane = tl.arange(0, COLS)
        for r in range(0, tl.minimum(nrows - row0, ROWS)):
            first = (row0 + r) * row_len
            n_r = tl.minimum(row_len, numel - first)  # the last virtual row may be short
            s_sq = tl.zeros([1], dtype=tl.float64)
            s_nan = tl.zeros([1], dtype=tl.int32)
            for c1 in range(0, n_r, COLS):
                s_sq, s_nan = _rows_chunk(g_b + first + c1, p_b + first + c1, lane[None, :],
                                          (lane < (n_r - c1))[None, :], scale_ptr, need_sq,
                                          s_sq, s_nan, G_DT, P_DT, HAS_SCALE)
            acc_sq = tl.where(rows == r, acc_sq + tl.sum(s_sq, axis=0), acc_sq)
            acc_nan = tl.where(rows == r, acc_nan + tl.sum(s_nan, axis=0), acc_nan)
    out = row0 + rows.to(tl.int64)
    tl.store(row_sumsq + slot + out, acc_sq, mask=out < nrows)
    tl.store(row_nan + slot + out, acc_nan, mask=out < nrows)


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
