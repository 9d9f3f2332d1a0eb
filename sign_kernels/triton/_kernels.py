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
DT_I8 = tl.constexpr(4)       # int8: the codes of an int8 momentum, the correction byte

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
F_OUT_AT = tl.constexpr(13)      # Tiger: index of the sums out in `sumsq_out`, or -1 (none wanted)
F_OUT_KEPT = tl.constexpr(14)    # Tiger: 1 where the wanted sums are the given ones, in place
F_BLK0 = tl.constexpr(15)        # index of the tensor's first block in the blocks table (aligned ones first)
F_RESID = tl.constexpr(16)       # address of the correction byte ρ (int8, θ's shape), 0 when none
F_SCALES = tl.constexpr(17)      # address of the int8 momentum's bf16 block scales, 0 when none
F_QCOLS = tl.constexpr(18)       # int8 momentum: the row length (last dim) its blocks are cut along
# (field 19 unused: 20 fields of 8 bytes keep the sub-tables after the tensor table 16-byte aligned)
NFIELDS = tl.constexpr(20)

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
# checked the addresses of every tensor of that launch, NOTE: [per-tensor alignment]),
# advance it by the block start (a multiple of BLOCK, itself hinted) and index it with an int32 `tl.arange`: the per-element offsets are then provably
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
    elif DT == DT_I8:
        ptr = addr.to(tl.pointer_type(tl.int8))
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
    # Returns the stored value as fp32 (what a later load gives; unused, it costs nothing).
    if DT == DT_F32:
        tl.store(ptr + offs, x, mask=mask)
        v = x
    elif DT == DT_BF16:
        if SR:
            bits = _bf16_bits(x, _sr_bits_lohi(key, lo0 + offs.to(tl.uint32), hi), True)
        else:
            bits = _bf16_bits(x, 0, False)
        tl.store(ptr + offs, bits.to(tl.uint16), mask=mask)
        v = ((bits & 0xFFFF) << 16).to(tl.float32, bitcast=True)
    else:
        bits = _fp16_bits(x).to(tl.uint16)
        tl.store(ptr + offs, bits, mask=mask)
        v = bits.to(tl.float16, bitcast=True).to(tl.float32)
    return v


@triton.jit
def _grad_used(g, scale_ptr, clip_ptr, HAS_SCALE: tl.constexpr, HAS_CLIP: tl.constexpr):
    """The gradient the math uses: (g / grad_scale) * clip, each op rounded to fp32, in that
    order (NOTE: [clipping inside the step] in sign_kernels/_ops.py); both read on the device."""
    if HAS_SCALE:
        g = tl.math.div_rn(g, tl.load(scale_ptr).to(tl.float32))
    if HAS_CLIP:
        g = g * tl.load(clip_ptr).to(tl.float32)
    return g


@triton.jit
def _ld_grad(g_ptr, offs, mask, scale_ptr, clip_ptr, G_DT: tl.constexpr, HAS_SCALE: tl.constexpr,
             HAS_CLIP: tl.constexpr):
    return _grad_used(_ld(g_ptr, offs, mask, G_DT), scale_ptr, clip_ptr, HAS_SCALE, HAS_CLIP)


@triton.jit
def _sign(x):
    # NOTE: [sign]: +1, -1, and 0 for ±0 and NaN.
    return (x > 0).to(tl.float32) - (x < 0).to(tl.float32)


# ------------------------------------------------------------------ the correction byte
# NOTE: [correction byte] in csrc/core/sign_math.h: θ^ = θ16 + ρ u(θ16), u = ulp / 256 (a power
# of two, 0 for inf / NaN), is the weight the rules update; θ16' = RNE(θ^') and
# ρ' = clamp(rint((θ^' - θ16') / u(θ16')), -127, 127) are written back. Every step is exact or
# an IEEE-rounded fp32 op (div_rn: dividing by a power of two is exact, but Triton's plain
# ``/`` is not IEEE on NVIDIA, and 1 / u overflows for the smallest units).
@triton.jit
def _ec_unit(b, P_DT: tl.constexpr):
    """u(θ16) of the 16 bits ``b`` (uint32) of a bf16 / fp16 θ (ec_unit)."""
    if P_DT == DT_BF16:
        e = ((b >> 7) & 0xFF).to(tl.int32)
        top = e == 0xFF
        p = tl.maximum(e, 1) - 142  # ulp 2^(e-127-7), / 256: in [-141, 112]
        normal = (tl.maximum(p + 127, 0).to(tl.uint32) << 23).to(tl.float32, bitcast=True)
        sub = (tl.full(p.shape, 1, tl.uint32) << tl.minimum(tl.maximum(p + 149, 0), 31).to(tl.uint32)) \
            .to(tl.float32, bitcast=True)
        u = tl.where(p >= -126, normal, sub)
    else:
        e = ((b >> 10) & 0x1F).to(tl.int32)
        top = e == 0x1F
        u = ((tl.maximum(e, 1) + 94).to(tl.uint32) << 23).to(tl.float32, bitcast=True)  # 2^(e-15-10-8)
    return tl.where(top, 0.0, u)


@triton.jit
def _bits16_value(b, P_DT: tl.constexpr):
    """fp32 value of the 16 bits ``b`` (uint32) of a bf16 / fp16 number (exact)."""
    if P_DT == DT_BF16:
        v = ((b & 0xFFFF) << 16).to(tl.float32, bitcast=True)
    else:
        v = b.to(tl.uint16).to(tl.float16, bitcast=True).to(tl.float32)
    return v


@triton.jit
def _rint(x):
    """Round to nearest, ties to even (rintf), from exact ops: floor, and the fraction's test."""
    f = tl.floor(x)
    d = x - f  # exact below 2**23; above, d = 0 and f = x
    odd = (f - 2.0 * tl.floor(f * 0.5)) != 0.0
    return f + tl.where((d > 0.5) | ((d == 0.5) & odd), 1.0, 0.0)


@triton.jit
def _ld_p(p_ptr, r_ptr, offs, mask, P_DT: tl.constexpr, EC: tl.constexpr):
    """θ as the rules see it: the storage value, or θ^ = θ16 + ρ u(θ16) with the correction byte."""
    if EC:
        b = _load(p_ptr + offs, mask).to(tl.uint32)
        rho = _load(r_ptr + offs, mask).to(tl.float32)
        x = _bits16_value(b, P_DT) + rho * _ec_unit(b, P_DT)
    else:
        x = _ld(p_ptr, offs, mask, P_DT)
    return x


@triton.jit
def _st_p(p_ptr, r_ptr, offs, x, mask, key, hi, lo0, P_DT: tl.constexpr, SR: tl.constexpr, EC: tl.constexpr):
    """Write θ (``_st``), or with the correction byte θ16 = RNE(x) and ρ (never SR). Returns θ16
    as fp32 (what Tiger's sums of squares read back)."""
    if EC:
        if P_DT == DT_BF16:
            b = _bf16_bits(x, 0, False)
        else:
            b = _fp16_bits(x)
        v = _bits16_value(b, P_DT)
        u = _ec_unit(b, P_DT)
        r = _rint(tl.math.div_rn(x - v, tl.where(u > 0.0, u, 1.0)))
        r = tl.where((u > 0.0) & (r == r), tl.minimum(tl.maximum(r, -127.0), 127.0), 0.0)
        tl.store(p_ptr + offs, b.to(tl.uint16), mask=mask)
        tl.store(r_ptr + offs, r.to(tl.int8), mask=mask)
    else:
        v = _st(p_ptr, offs, x, mask, key, hi, lo0, P_DT, SR)
    return v


# ------------------------------------------------------------------ int8 momentum
# NOTE: [int8 momentum] in csrc/core/sign_math.h (the reference: sign_kernels/_quant.py): codes
# c (int8) and one bf16 scale s per block of QBLOCK = 64 elements of a row (the last block of a
# row may be shorter); value(c) = sign(c) (s ((c c) K)), K = fp32(1 / 127^2). The new momentum
# of a block is computed in fp32 for all its elements, then scale = bf16 of max |m| (NaN
# ignored) rounded up, inv = 1 / s once per block, and each code rounds r = |m| inv on the
# square-law levels, up where u (vhi - vlo) < |m| - vlo, with u the 24 high bits of
# sr_bits(key_m, f32_bits(m)) (a function of the value, not the index).
# ``sign_q8_kernel`` maps a [QROWS, QBLOCK] tile to QROWS consecutive blocks of one tensor: the
# block index q (row r = q // nb, j = q % nb) is also the index of its scale (scales are
# [rows, nb], contiguous), and the max over axis 1 is the block's absmax.
QBLOCK = tl.constexpr(64)
Q8_K = tl.constexpr(0x38820610)  # the bits of K = fp32(1 / 127^2)


@triton.jit
def _q8_level(s, c):
    """|value| of code magnitudes c (fp32) under scale s: s * ((c c) K), each product rounded."""
    return s * ((c * c) * tl.full(c.shape, Q8_K, tl.uint32).to(tl.float32, bitcast=True))


@triton.jit
def _q8_dequant(code, s):
    c = code.to(tl.float32)
    v = _q8_level(s, tl.where(c < 0.0, -c, c))
    return tl.where(c < 0.0, -v, v)


@triton.jit
def _q8_code(m, s, inv, key):
    """q8_code: the int8 code of fp32 m under block scale s (its bf16 value as fp32), inv = 1 / s."""
    a = tl.where(m < 0.0, -m, m)
    r = a * inv
    ok = (r >= 0.0) & (r < 2.0)  # false for s = 0 (0 * inf), a = inf with s = inf, NaN
    lo = tl.floor(127.0 * tl.math.sqrt_rn(tl.where(ok, r, 0.0)))
    lo = tl.where(lo > 126.0, 126.0, lo)
    vlo = _q8_level(s, lo)
    bits = _mix32(key ^ _mix32(m.to(tl.uint32, bitcast=True)))  # sr_bits32(key, f32_bits(m))
    u = (bits >> 8).to(tl.float32) * 5.9604644775390625e-8  # 2^-24
    c = lo + tl.where(u * (_q8_level(s, lo + 1.0) - vlo) < a - vlo, 1.0, 0.0)
    c = tl.where(m < 0.0, -c, c)
    return tl.where(ok, c, 0.0).to(tl.int8)


@triton.jit
def _q8_store(m_ptr, sc_ptr, offs, mask, q, qmask, m, key):
    """Quantize the tile's new momentum m ([QROWS, QBLOCK], one block per row; lanes off
    ``mask`` are not the block's) and store its codes and the blocks' scales at sc_ptr + q."""
    a = tl.where(m < 0.0, -m, m)
    if mask is None:
        a = tl.where(a == a, a, 0.0)  # NaN is ignored
    else:
        a = tl.where(mask & (a == a), a, 0.0)
    amax = tl.max(a, axis=1)
    sb = (amax.to(tl.uint32, bitcast=True) + 0xFFFF) >> 16  # bf16_bits_up
    s_new = (sb << 16).to(tl.float32, bitcast=True)
    inv = tl.math.div_rn(tl.full(s_new.shape, 1.0, tl.float32), s_new)  # one division per block
    tl.store(m_ptr + offs, _q8_code(m, s_new[:, None], inv[:, None], key), mask=mask)
    tl.store(sc_ptr + q, sb.to(tl.uint16), mask=qmask)


# ------------------------------------------------------------------ Tiger sums of squares
# NOTE: [Triton sums of squares] Tiger's fp64 sums of squares of θ (RMS of the matrix and
# embedding roles) are summed in one order, fixed by the values' positions alone, wherever
# they are computed: by the read-only pre-pass (``tiger_sumsq_kernel``) from θ at the start of
# a call, or as a by-product of the update (``sign_step_kernel`` with SUMSQ) from θ as the call
# leaves it (NOTE: [Tiger sums of squares out] in sign_kernels/_ops.py). The two must give the
# same bits, and a ``tl.sum`` cannot promise that: its order follows the register layout the
# compiler picks for each kernel (sizes per thread, warps), which differs between kernels. So:
# * the tensor is cut into the update's blocks of BLOCK elements (from element 0);
# * a row (embedding: a row of the last dim; matrix: the whole tensor) meets a block in one
#   segment; the segment's partial is a pairwise tree (``_tree_sum``: adjacent pairs, level
#   by level) over the block's BLOCK positions, x² in the segment and 0 elsewhere (adding 0
#   is exact, so a row's partial does not depend on the other rows in the block);
# * a block stores the partial of its first row (head) and of its last row (tail) at
#   blk[2 b], blk[2 b + 1], and the sum of every row lying whole in it directly;
# * a row over several blocks sums its partials in block order, left to right
#   (``_crossing_rows``); a matrix's total is ``_matrix_total``: pairwise trees over runs of
#   FINISH_BLOCK block partials, added in order.
# Every step is an explicit fp64 add of two values, so the interpreter and any compiled
# layout give the same bits. The order differs from the reference's torch sum (the fp32 RMS
# can differ by an ulp where it sits on a rounding boundary) and from the 16x256 row tiles
# this backend summed before (those followed tl.sum's layout and could not be reproduced by
# the update's blocks).
@triton.jit
def _tree_sum(x, LOG2: tl.constexpr):
    """Sum of a 1-D fp64 tensor of 2**LOG2 elements: adjacent pairs, level by level. Each level
    is a tl.sum over an axis of 2: one add of two values, whatever the layout (a tl.split there
    compiles to layout conversions: 208 registers for 2048 elements, against 32)."""
    for _ in tl.static_range(LOG2):
        x = tl.sum(tl.reshape(x, [x.shape[0] // 2, 2]), axis=1)
    return tl.sum(x, axis=0)  # one element left: exact


@triton.jit
def _block_task(tensors, blocks, ALIGNED: tl.constexpr, BLOCK: tl.constexpr):
    """(pid, tensor index, the block's first element, the tensor's table row) of this program's
    block. The launcher's ``blocks`` (and the block partials ``blk``, NOTE: [Triton sums of
    squares]) start at the launch's first block (NOTE: [per-tensor alignment] in ``_launch``),
    so pid indexes both."""
    pid = tl.program_id(0).to(tl.int64)
    ti = tl.load(blocks + 2 * pid)
    start = tl.load(blocks + 2 * pid + 1)
    if ALIGNED:
        start = tl.multiple_of(start, BLOCK)
    return pid, ti, start, tensors + ti * NFIELDS


@triton.jit
def _row_in_block(offs, start, row_len, BLOCK: tl.constexpr):
    """(q0, r0, ri): the row of the block's first element, its column, and each element's row
    relative to q0 (int32; a row of >= BLOCK elements is crossed at most once in a block)."""
    q0 = start // row_len
    r0 = start - q0 * row_len
    if row_len >= BLOCK:
        ri = (offs >= tl.minimum(row_len - r0, BLOCK).to(tl.int32)).to(tl.int32)
    else:
        ri = (r0.to(tl.int32) + offs) // row_len.to(tl.int32)
    return q0, r0, ri


@triton.jit
def _block_sums(x, count, bi, start, row_len, is_rows, rows_out, blk,
                LOG2: tl.constexpr, BLOCK: tl.constexpr):
    """The partial sums of squares of one block (NOTE: [Triton sums of squares]): x the block's
    θ (fp32, BLOCK lanes, `count` of them real), bi its index in the blocks table; is_rows:
    rows of ``row_len`` (embedding), else one row (matrix). Rows lying whole in the block go
    to rows_out[row] (embedding only); head and tail partials to blk[2 bi], blk[2 bi + 1]."""
    offs = tl.arange(0, BLOCK)
    xd = x.to(tl.float64)
    sq = tl.where(offs < count, xd * xd, 0.0)
    if is_rows:
        q0, r0, ri = _row_in_block(offs, start, row_len, BLOCK)
        nr = (r0 + count - 1) // row_len + 1  # rows meeting the block
        for r in range(0, nr):
            part = _tree_sum(tl.where(ri == r, sq, 0.0), LOG2)
            whole = ((r > 0) | (r0 == 0)) & ((r < nr - 1) | ((r0 + count) % row_len == 0))
            if whole:
                tl.store(rows_out + q0 + r, part)
            if r == 0:
                tl.store(blk + 2 * bi, part)
            if r == nr - 1:
                tl.store(blk + 2 * bi + 1, part)
    else:
        part = _tree_sum(sq, LOG2)
        tl.store(blk + 2 * bi, part)
        tl.store(blk + 2 * bi + 1, part)


@triton.jit
def _crossing_rows(blk, blk0, r, ok, row_len, UBLOCK: tl.constexpr):
    """For rows r (a vector; ok: which to take): whether each spans several update blocks of
    UBLOCK elements, and its sum of squares then: the tail partial of its first block, then the
    head partials of the next ones, added in block order (NOTE: [Triton sums of squares])."""
    first = r * row_len
    b0 = first // UBLOCK
    b1 = (first + row_len - 1) // UBLOCK
    cross = ok & (b1 > b0)
    s = tl.load(blk + 2 * (blk0 + b0) + 1, mask=cross, other=0.0)
    for j in range(1, (row_len + UBLOCK - 2) // UBLOCK + 1):  # the most blocks a row spans, - 1
        s = s + tl.load(blk + 2 * (blk0 + b0 + j), mask=cross & (b0 + j <= b1), other=0.0)
    return cross, s


@triton.jit
def _matrix_total(blk, blk0, nblk, FB: tl.constexpr, LOG2_FB: tl.constexpr):
    """A matrix's sum of squares from its block partials (NOTE: [Triton sums of squares])."""
    total = tl.zeros([1], dtype=tl.float64)
    for c0 in range(0, nblk, FB):
        b = c0 + tl.arange(0, FB).to(tl.int64)
        v = tl.load(blk + 2 * (blk0 + b), mask=b < nblk, other=0.0)
        total = total + _tree_sum(v, LOG2_FB)
    return tl.sum(total, axis=0)


@triton.jit
def _sums_out(x, count, bi, start, row, written, sumsq_out, blk, LOG2: tl.constexpr, BLOCK: tl.constexpr):
    """The by-product (NOTE: [Tiger sums of squares out]): x is θ as this call leaves the block.
    Wanted where the table gives an index, unless θ is not written and the wanted sums are the
    given ones in place (they already describe it)."""
    out_at = tl.load(row + F_OUT_AT)
    if (out_at >= 0) & (written | (tl.load(row + F_OUT_KEPT) == 0)):
        _block_sums(x, count, bi, start, tl.load(row + F_ROWLEN), tl.load(row + F_ROLE) == ROLE_EMBEDDING,
                    sumsq_out + out_at, blk, LOG2, BLOCK)


# ------------------------------------------------------------------ the update kernel
@triton.jit
def _update_block(
    p_ptr, g_ptr, m_ptr, r_ptr, offs, mask, hi, lo0, step, ti, start, row,
    lr_, scale_ptr, clip_ptr, weight_decay, beta1, beta2, shrink, k, window, threshold,
    t_nan, t_rms, row_rms, bi, count, blk, sumsq_out,
    ALGO: tl.constexpr, P_DT: tl.constexpr, G_DT: tl.constexpr, M_DT: tl.constexpr,
    HAS_SCALE: tl.constexpr, HAS_CLIP: tl.constexpr, SR: tl.constexpr, BLOCK: tl.constexpr,
    SUMSQ: tl.constexpr, LOG2_BLOCK: tl.constexpr, EC: tl.constexpr,
):
    """One block of one tensor: pointers already advanced to the block start, offs an int32
    arange, mask None (full block) or the tail mask; bi the block's index in the blocks table,
    count its real elements. SUMSQ (Tiger): the sums of squares of θ as the block leaves it
    (NOTE: [Triton sums of squares]). EC: θ carries the correction byte at r_ptr (NOTE:
    [correction byte]); the sums are of θ16."""
    seed = tl.load(row + F_SEED).to(tl.uint32)
    wd = tl.cast(weight_decay, tl.float32)
    p = _ld_p(p_ptr, r_ptr, offs, mask, P_DT, EC)

    if ALGO == ALGO_LION:
        g = _ld_grad(g_ptr, offs, mask, scale_ptr, clip_ptr, G_DT, HAS_SCALE, HAS_CLIP)
        b1 = tl.cast(beta1, tl.float32)
        b2 = tl.cast(beta2, tl.float32)
        m = _ld(m_ptr, offs, mask, M_DT)
        decay = 1.0 - lr_ * wd
        c = b1 * m + (1.0 - b1) * g
        p_new = p * decay - lr_ * _sign(c)
        m_new = b2 * m + (1.0 - b2) * g
        _st_p(p_ptr, r_ptr, offs, p_new, mask, _sr_key(seed, step, SALT_PARAM), hi, lo0, P_DT, SR, EC)
        _st(m_ptr, offs, m_new, mask, _sr_key(seed, step, SALT_STATE), hi, lo0, M_DT, SR)
    elif ALGO == ALGO_TIGER:
        # NOTE: [tiger registers] each value is computed in the branch that stores it, so the
        # shrunk θ, the updated θ and the row RMS are never live at the same time.
        beta = tl.cast(beta1, tl.float32)
        role = tl.load(row + F_ROLE)
        kk = tl.cast(k, tl.int64)
        nan = tl.load(t_nan + ti) != 0
        update = ((step + 1) % kk) == 0
        if EC:
            p_out = _ld(p_ptr, offs, mask, P_DT)  # θ16 as the call leaves it (SUMSQ): the stored weight
        else:
            p_out = p  # θ as the call leaves it (SUMSQ)
        if nan:
            # NaN guard: p = (p - c) s + c, m unchanged.
            centre = tl.where(role == ROLE_GAIN, 1.0, 0.0)
            p_shrunk = (p - centre) * tl.cast(shrink, tl.float32) + centre
            p_st = _st_p(p_ptr, r_ptr, offs, p_shrunk, mask, _sr_key(seed, step, SALT_PARAM), hi, lo0, P_DT, SR,
                         EC)
            if SUMSQ:
                p_out = p_st
        else:
            b1 = tl.where(step % kk == 0, beta, 1.0)
            coef = tl.math.div_rn(1.0 - beta, kk.to(tl.float32))
            g = _ld_grad(g_ptr, offs, mask, scale_ptr, clip_ptr, G_DT, HAS_SCALE, HAS_CLIP)
            m = _ld(m_ptr, offs, mask, M_DT)
            m_new = b1 * m + coef * g
            if update:
                # lr_p: 0.5 lr (element-wise roles), lr * RMS(tensor) or lr * RMS(row).
                elementwise = role < ROLE_EMBEDDING
                if role == ROLE_EMBEDDING:
                    # Row of each element: q0 + ri (int32; a row of >= BLOCK elements is
                    # crossed at most once in a block).
                    row_len = tl.load(row + F_ROWLEN)
                    q0, r0, ri = _row_in_block(offs, start, row_len, BLOCK)
                    rms = _load(row_rms + tl.load(row + F_SLOT) + q0 + ri, mask)
                else:
                    rms = tl.zeros([BLOCK], dtype=tl.float32) + tl.load(t_rms + ti)
                lr_p = tl.where(elementwise, 0.5 * lr_, lr_ * rms)
                wd_p = tl.where(elementwise, 0.0, wd)
                p_upd = p - lr_p * (_sign(m_new) + wd_p * p)
                p_st = _st_p(p_ptr, r_ptr, offs, p_upd, mask, _sr_key(seed, step, SALT_PARAM), hi, lo0, P_DT, SR,
                             EC)
                if SUMSQ:
                    p_out = p_st
            _st(m_ptr, offs, m_new, mask, _sr_key(seed, step, SALT_STATE), hi, lo0, M_DT, SR)
        if SUMSQ:
            _sums_out(p_out, count, bi, start, row, nan | update, sumsq_out, blk, LOG2_BLOCK, BLOCK)
    else:
        g = _ld_grad(g_ptr, offs, mask, scale_ptr, clip_ptr, G_DT, HAS_SCALE, HAS_CLIP)
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
    clip_ptr,                              # optional 0-dim fp32 clipping coefficient (HAS_CLIP)
    weight_decay, beta1, beta2, shrink,    # Lion: beta1, beta2; Tiger: beta1 = beta, shrink
    k, window, threshold,                  # Tiger: grad_accum_steps; Simba: W, T
    t_nan, t_rms, row_rms,                 # Tiger stats: per-tensor NaN flag, RMS, per-row RMS
    blk, sumsq_out,                        # Tiger SUMSQ: block partials (fp64 [2 n_blocks]), the sums out
    ALGO: tl.constexpr, P_DT: tl.constexpr, G_DT: tl.constexpr, M_DT: tl.constexpr,
    HAS_LR_T: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_FOUND: tl.constexpr,
    SR: tl.constexpr, ALIGNED: tl.constexpr, BLOCK: tl.constexpr,
    SUMSQ: tl.constexpr = False, LOG2_BLOCK: tl.constexpr = 11, HAS_CLIP: tl.constexpr = False,
    EC: tl.constexpr = False,
):
    """The update of Lion, Tiger and Simba over BLOCK-element blocks of each tensor, with the
    state in a float dtype (or Simba's counters). EC (Lion, Tiger; 16-bit θ): the correction
    byte (NOTE: [correction byte]), at the table's F_RESID. Int8 momentum: ``sign_q8_kernel``."""
    bi, ti, start, row = _block_task(tensors, blocks, ALIGNED, BLOCK)
    numel = tl.load(row + F_NUMEL)
    sums_only = False  # a compile-time False unless SUMSQ and HAS_FOUND
    if HAS_FOUND:
        # GradScaler skipped this step: touch nothing (NaN counts as found); with SUMSQ the
        # blocks still read θ for the sums out.
        skip = tl.load(found_ptr).to(tl.float32) != 0.0
        if SUMSQ:
            sums_only = skip
        else:
            numel = tl.where(skip, 0, numel)
    if start < numel:
        step = tl.load(tl.load(row + F_STEP).to(tl.pointer_type(tl.int64)))
        if HAS_LR_T:
            lr_ = tl.load(lr_t).to(tl.float32)
        else:
            lr_ = tl.cast(lr, tl.float32)
        p_ptr = _typed_ptr(tl.load(row + F_PARAM), P_DT, ALIGNED) + start
        g_ptr = _typed_ptr(tl.load(row + F_GRAD), G_DT, ALIGNED) + start
        m_ptr = _typed_ptr(tl.load(row + F_STATE), M_DT, ALIGNED) + start
        if EC:
            r_ptr = _typed_ptr(tl.load(row + F_RESID), DT_I8, ALIGNED) + start
        else:
            r_ptr = p_ptr  # unused
        # SR element index = start + offs; a block never crosses a multiple of 2**32.
        hi = (start >> 32).to(tl.uint32)
        lo0 = start.to(tl.uint32)
        offs = tl.arange(0, BLOCK)
        rem = numel - start
        count = tl.minimum(rem, BLOCK)
        if sums_only:
            # Nothing written: the sums out of θ as it is.
            if rem >= BLOCK:
                p = _ld(p_ptr, offs, None, P_DT)
            else:
                p = _ld(p_ptr, offs, offs < rem.to(tl.int32), P_DT)
            _sums_out(p, count, bi, start, row, False, sumsq_out, blk, LOG2_BLOCK, BLOCK)
        elif rem >= BLOCK:
            _update_block(p_ptr, g_ptr, m_ptr, r_ptr, offs, None, hi, lo0, step, ti, start, row,
                          lr_, scale_ptr, clip_ptr, weight_decay, beta1, beta2, shrink, k, window,
                          threshold, t_nan, t_rms, row_rms, bi, count, blk, sumsq_out,
                          ALGO, P_DT, G_DT, M_DT, HAS_SCALE, HAS_CLIP, SR, BLOCK, SUMSQ, LOG2_BLOCK, EC)
        else:
            _update_block(p_ptr, g_ptr, m_ptr, r_ptr, offs, offs < rem.to(tl.int32), hi, lo0, step, ti,
                          start, row, lr_, scale_ptr, clip_ptr, weight_decay, beta1, beta2, shrink, k,
                          window, threshold, t_nan, t_rms, row_rms, bi, count, blk, sumsq_out,
                          ALGO, P_DT, G_DT, M_DT, HAS_SCALE, HAS_CLIP, SR, BLOCK, SUMSQ, LOG2_BLOCK, EC)



# ------------------------------------------------------------------ the update with int8 momentum
@triton.jit
def _q8_tile(
    p_ptr, g_ptr, m_ptr, r_ptr, sc_ptr, offs, mask, q, qmask, rq, hi, lo0, step, ti, row,
    lr_, scale_ptr, clip_ptr, weight_decay, beta1, beta2, shrink, k, t_nan, t_rms, row_rms,
    ALGO: tl.constexpr, P_DT: tl.constexpr, G_DT: tl.constexpr, HAS_SCALE: tl.constexpr,
    HAS_CLIP: tl.constexpr, SR: tl.constexpr, EC: tl.constexpr, QROWS: tl.constexpr,
):
    """QROWS int8 blocks of one tensor (NOTE: [int8 momentum]): offs / mask [QROWS, QBLOCK]
    (mask None: every lane is a block's), q the blocks' indices (their scales' too), rq their
    rows. The update of every element in fp32 as ``_update_block``'s, then the blocks' codes and
    scales from the new momentum."""
    seed = tl.load(row + F_SEED).to(tl.uint32)
    wd = tl.cast(weight_decay, tl.float32)
    if ALGO == ALGO_LION:
        g = _ld_grad(g_ptr, offs, mask, scale_ptr, clip_ptr, G_DT, HAS_SCALE, HAS_CLIP)
        m = _q8_dequant(_load(m_ptr + offs, mask), _ld(sc_ptr, q, qmask, DT_BF16)[:, None])
        p = _ld_p(p_ptr, r_ptr, offs, mask, P_DT, EC)
        b1 = tl.cast(beta1, tl.float32)
        b2 = tl.cast(beta2, tl.float32)
        decay = 1.0 - lr_ * wd
        c = b1 * m + (1.0 - b1) * g
        p_new = p * decay - lr_ * _sign(c)
        m_new = b2 * m + (1.0 - b2) * g
        _st_p(p_ptr, r_ptr, offs, p_new, mask, _sr_key(seed, step, SALT_PARAM), hi, lo0, P_DT, SR, EC)
        _q8_store(m_ptr, sc_ptr, offs, mask, q, qmask, m_new, _sr_key(seed, step, SALT_STATE))
    else:
        beta = tl.cast(beta1, tl.float32)
        role = tl.load(row + F_ROLE)
        kk = tl.cast(k, tl.int64)
        if tl.load(t_nan + ti) != 0:
            # NaN guard: p = (p - c) s + c; the momentum (codes and scales) unchanged.
            centre = tl.where(role == ROLE_GAIN, 1.0, 0.0)
            p = _ld_p(p_ptr, r_ptr, offs, mask, P_DT, EC)
            _st_p(p_ptr, r_ptr, offs, (p - centre) * tl.cast(shrink, tl.float32) + centre, mask,
                  _sr_key(seed, step, SALT_PARAM), hi, lo0, P_DT, SR, EC)
        else:
            b1 = tl.where(step % kk == 0, beta, 1.0)
            coef = tl.math.div_rn(1.0 - beta, kk.to(tl.float32))
            g = _ld_grad(g_ptr, offs, mask, scale_ptr, clip_ptr, G_DT, HAS_SCALE, HAS_CLIP)
            m = _q8_dequant(_load(m_ptr + offs, mask), _ld(sc_ptr, q, qmask, DT_BF16)[:, None])
            m_new = b1 * m + coef * g
            if ((step + 1) % kk) == 0:
                # lr_p: 0.5 lr (element-wise roles), lr * RMS(tensor) or lr * RMS(row of the block).
                elementwise = role < ROLE_EMBEDDING
                if role == ROLE_EMBEDDING:
                    rms = _load(row_rms + tl.load(row + F_SLOT) + rq, qmask)
                else:
                    rms = tl.zeros([QROWS], dtype=tl.float32) + tl.load(t_rms + ti)
                lr_p = tl.where(elementwise, 0.5 * lr_, lr_ * rms)[:, None]
                wd_p = tl.where(elementwise, 0.0, wd)
                p = _ld_p(p_ptr, r_ptr, offs, mask, P_DT, EC)
                p_upd = p - lr_p * (_sign(m_new) + wd_p * p)
                _st_p(p_ptr, r_ptr, offs, p_upd, mask, _sr_key(seed, step, SALT_PARAM), hi, lo0, P_DT, SR, EC)
            _q8_store(m_ptr, sc_ptr, offs, mask, q, qmask, m_new, _sr_key(seed, step, SALT_STATE))


@triton.jit(do_not_specialize=["k"])
def sign_q8_kernel(
    tensors, qtasks,                       # int64 tables: [n, NFIELDS], [n_qtasks, 2] (tensor, first block)
    lr, lr_t, scale_ptr, found_ptr, clip_ptr,
    weight_decay, beta1, beta2, shrink, k,  # Lion: beta1, beta2; Tiger: beta1 = beta, shrink, k
    t_nan, t_rms, row_rms,                 # Tiger stats, as sign_step_kernel's
    ALGO: tl.constexpr, P_DT: tl.constexpr, G_DT: tl.constexpr,
    HAS_LR_T: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_FOUND: tl.constexpr, HAS_CLIP: tl.constexpr,
    SR: tl.constexpr, EC: tl.constexpr, ALIGNED: tl.constexpr, QROWS: tl.constexpr,
):
    """Lion / Tiger with an int8 momentum (NOTE: [int8 momentum]), optionally with the correction
    byte (EC): one program per QROWS consecutive int8 blocks of a tensor. Tiger's NaN flags and
    RMS come from the same pre-pass as ``sign_step_kernel``'s; its sums out are read back from θ
    after this kernel (``tiger_sums_after_kernel``). Where the rows are whole blocks (the last
    dim a multiple of QBLOCK) the tile is one contiguous run of QROWS * QBLOCK elements: with
    ALIGNED its offsets are int32 from a hinted base (vector accesses: 16 bytes of fp32, 8 of
    16-bit data at 4 elements per thread; NOTE: [vector hints])."""
    pid = tl.program_id(0).to(tl.int64)
    ti = tl.load(qtasks + 2 * pid)
    q0 = tl.load(qtasks + 2 * pid + 1)
    if ALIGNED:
        q0 = tl.multiple_of(q0, QROWS)  # the launcher's tasks: step QROWS
    row = tensors + ti * NFIELDS
    go = True
    if HAS_FOUND:
        go = tl.load(found_ptr).to(tl.float32) == 0.0  # GradScaler skipped this step: touch nothing
    if go:
        step = tl.load(tl.load(row + F_STEP).to(tl.pointer_type(tl.int64)))
        if HAS_LR_T:
            lr_ = tl.load(lr_t).to(tl.float32)
        else:
            lr_ = tl.cast(lr, tl.float32)
        L = tl.load(row + F_QCOLS)
        nb = (L + QBLOCK - 1) // QBLOCK
        nq = (tl.load(row + F_NUMEL) // L) * nb
        sc_ptr = _typed_ptr(tl.load(row + F_SCALES), DT_BF16, False)
        p_ptr = _typed_ptr(tl.load(row + F_PARAM), P_DT, ALIGNED)
        g_ptr = _typed_ptr(tl.load(row + F_GRAD), G_DT, ALIGNED)
        m_ptr = _typed_ptr(tl.load(row + F_STATE), DT_I8, ALIGNED)
        if EC:
            r_ptr = _typed_ptr(tl.load(row + F_RESID), DT_I8, ALIGNED)
        else:
            r_ptr = m_ptr  # unused
        lanes = tl.arange(0, QROWS)
        col = tl.arange(0, QBLOCK)
        q = q0 + lanes
        qm = q < nq
        rq = q // nb
        whole = False  # a compile-time False without ALIGNED: one path
        if ALIGNED:
            whole = L % QBLOCK == 0
        if whole:
            # Whole blocks: the tile is elements [q0 QBLOCK, (q0 + QROWS) QBLOCK), never across
            # a multiple of 2**32 (the SR index's high word is the tile's).
            base = q0 * QBLOCK
            offs_w = lanes[:, None] * QBLOCK + col[None, :]
            if q0 + QROWS <= nq:
                _q8_tile(p_ptr + base, g_ptr + base, m_ptr + base, r_ptr + base, sc_ptr, offs_w, None, q, None,
                         rq, (base >> 32).to(tl.uint32), base.to(tl.uint32), step, ti, row, lr_, scale_ptr,
                         clip_ptr, weight_decay, beta1, beta2, shrink, k, t_nan, t_rms, row_rms,
                         ALGO, P_DT, G_DT, HAS_SCALE, HAS_CLIP, SR, EC, QROWS)
            else:
                _q8_tile(p_ptr + base, g_ptr + base, m_ptr + base, r_ptr + base, sc_ptr, offs_w,
                         qm[:, None] & (col[None, :] >= 0), q, qm, rq, (base >> 32).to(tl.uint32),
                         base.to(tl.uint32), step, ti, row, lr_, scale_ptr, clip_ptr, weight_decay, beta1,
                         beta2, shrink, k, t_nan, t_rms, row_rms, ALGO, P_DT, G_DT, HAS_SCALE, HAS_CLIP, SR,
                         EC, QROWS)
        else:
            # Any row length: block (r, j) starts at r L + j QBLOCK and holds min(QBLOCK, L - j QBLOCK)
            # elements; int64 offsets from the tensor's start (the SR index itself).
            j = q - rq * nb
            offs_a = (rq * L + j * QBLOCK)[:, None] + col[None, :]
            mask_a = qm[:, None] & (col[None, :] < tl.minimum(L - j * QBLOCK, QBLOCK)[:, None])
            _q8_tile(p_ptr, g_ptr, m_ptr, r_ptr, sc_ptr, offs_a, mask_a, q, qm, rq, (offs_a >> 32).to(tl.uint32),
                     tl.cast(0, tl.uint32), step, ti, row, lr_, scale_ptr, clip_ptr, weight_decay, beta1, beta2,
                     shrink, k, t_nan, t_rms, row_rms, ALGO, P_DT, G_DT, HAS_SCALE, HAS_CLIP, SR, EC, QROWS)


@triton.jit(do_not_specialize=["k"])
def tiger_sums_after_kernel(
    tensors, blocks, t_nan, found_ptr, k, blk, sumsq_out,
    P_DT: tl.constexpr, HAS_FOUND: tl.constexpr, ALIGNED: tl.constexpr, BLOCK: tl.constexpr,
    LOG2_BLOCK: tl.constexpr,
):
    """Tiger with int8 momentum and its sums out (NOTE: [Tiger sums of squares out]): after
    ``sign_q8_kernel``, θ as the call leaves it is read back over the update's blocks and summed
    as the pre-pass sums it (NOTE: [Triton sums of squares]): the same ``_sums_out`` as the SUMSQ
    update and its sums-only call, so the bits are those of every path."""
    bi, ti, start, row = _block_task(tensors, blocks, ALIGNED, BLOCK)
    step = tl.load(tl.load(row + F_STEP).to(tl.pointer_type(tl.int64)))
    written = (tl.load(t_nan + ti) != 0) | (((step + 1) % tl.cast(k, tl.int64)) == 0)
    if HAS_FOUND:
        written = written & (tl.load(found_ptr).to(tl.float32) == 0.0)
    rem = tl.load(row + F_NUMEL) - start
    p_ptr = _typed_ptr(tl.load(row + F_PARAM), P_DT, ALIGNED) + start
    offs = tl.arange(0, BLOCK)
    if (tl.load(row + F_OUT_AT) >= 0) & (written | (tl.load(row + F_OUT_KEPT) == 0)):
        if rem >= BLOCK:
            x = _ld(p_ptr, offs, None, P_DT)
        else:
            x = _ld(p_ptr, offs, offs < rem.to(tl.int32), P_DT)
        _sums_out(x, tl.minimum(rem, BLOCK), bi, start, row, written, sumsq_out, blk, LOG2_BLOCK, BLOCK)


# ------------------------------------------------------------------ Tiger statistics
@triton.jit
def _rows_chunk(g_ptr, offs, mask, scale_ptr, clip_ptr, acc_nan, G_DT: tl.constexpr, HAS_SCALE: tl.constexpr,
                HAS_CLIP: tl.constexpr):
    # One [ROWS, COLS] chunk: per row, a value that is non-zero iff the gradient used
    # (g / grad_scale * clip) has a NaN there. NOTE: [NaN flags] the chunk's NaN count (at most
    # COLS) is combined with the row's by max, never added: a sum of 2**31 NaNs or more would
    # wrap in int32 and read as none.
    g = _grad_used(_ld(g_ptr, offs, mask, G_DT), scale_ptr, clip_ptr, HAS_SCALE, HAS_CLIP)
    return tl.maximum(acc_nan, tl.sum((g != g).to(tl.int32), axis=1))


@triton.jit
def tiger_rows_kernel(
    tensors, tasks,                        # tasks: [n_tasks, 2] (tensor, first row)
    scale_ptr, clip_ptr, row_nan,          # row_nan: per stats row, int32, non-zero iff the gradient used has a NaN
    G_DT: tl.constexpr, HAS_SCALE: tl.constexpr, ALIGNED: tl.constexpr,
    ROWS: tl.constexpr, COLS: tl.constexpr, HAS_CLIP: tl.constexpr = False,
):
    """Pass 1a: per stats row, whether the gradient used (g / grad_scale * clip) holds a NaN
    (non-zero iff so, NOTE: [NaN flags]; any order gives the same result). The sums of squares of θ are pass 1b,
    ``tiger_sumsq_kernel``."""
    pid = tl.program_id(0).to(tl.int64)
    ti = tl.load(tasks + 2 * pid)
    row0 = tl.multiple_of(tl.load(tasks + 2 * pid + 1), ROWS)  # the launcher's tasks: step ROWS
    row = tensors + ti * NFIELDS
    numel = tl.load(row + F_NUMEL)
    row_len = tl.load(row + F_ROWLEN)
    nrows = tl.load(row + F_NROWS)
    slot = tl.load(row + F_SLOT)
    # A given NaN count (NOTE: [Tiger statistics input]): g is not read here.
    if tl.load(row + F_GIVEN_NAN) < 0:
        acc_nan = tl.zeros([ROWS], dtype=tl.int32)
        rows = tl.arange(0, ROWS)
        cols = tl.arange(0, COLS)
        # NOTE: [vector hints] Fast path: the tile's ROWS rows all exist and are whole, and the
        # row length is a multiple of 8 elements (16 bytes of 16-bit data), so with the pointer
        # advanced to the tile's first element every row of the tile starts 16-byte aligned
        # (rl below carries that divisibility to the compiler) and full COLS chunks need no
        # mask. Offsets inside the tile are int32 (row_len <= 2**26 keeps ROWS * row_len below
        # 2**31).
        if ((row0 + ROWS) * row_len <= numel) & (row_len % 8 == 0) & (row_len <= 67108864):
            g_t = _typed_ptr(tl.load(row + F_GRAD), G_DT, ALIGNED) + row0 * row_len
            rl = (row_len.to(tl.int32) // 8) * 8
            base = rows[:, None] * rl
            n_full = (rl // COLS) * COLS
            for c0 in range(0, n_full, COLS):
                acc_nan = _rows_chunk(g_t, base + (c0 + cols)[None, :], None, scale_ptr, clip_ptr, acc_nan,
                                      G_DT, HAS_SCALE, HAS_CLIP)
            if n_full < rl:
                tail = n_full + cols
                msk = (rows[:, None] >= 0) & (tail[None, :] < rl)
                acc_nan = _rows_chunk(g_t, base + tail[None, :], msk, scale_ptr, clip_ptr, acc_nan, G_DT,
                                      HAS_SCALE, HAS_CLIP)
        else:
            # Any other tile (the last of a tensor, odd or huge rows, unaligned addresses): one
            # row at a time in chunks of COLS, the row's start a scalar int64 and the offsets
            # int32 (slower, but it only takes the last tile of a tensor, rows of an odd length
            # and huge rows).
            g_b = _typed_ptr(tl.load(row + F_GRAD), G_DT, False)
            lane = tl.arange(0, COLS)
            for r in range(0, tl.minimum(nrows - row0, ROWS)):
                first = (row0 + r) * row_len
                n_r = tl.minimum(row_len, numel - first)  # the last virtual row may be short
                s_nan = tl.zeros([1], dtype=tl.int32)
                for c1 in range(0, n_r, COLS):
                    s_nan = _rows_chunk(g_b + first + c1, lane[None, :], (lane < (n_r - c1))[None, :],
                                        scale_ptr, clip_ptr, s_nan, G_DT, HAS_SCALE, HAS_CLIP)
                acc_nan = tl.where(rows == r, tl.maximum(acc_nan, tl.max(s_nan, axis=0)), acc_nan)  # NOTE: [NaN flags]
        out = row0 + rows.to(tl.int64)
        tl.store(row_nan + slot + out, acc_nan, mask=out < nrows)


@triton.jit
def _needs_sums(row, k):
    """Whether this call computes the RMS of the tensor from θ: an updating step of a matrix or
    an embedding whose sums are not given (NOTE: [Tiger statistics input])."""
    step = tl.load(tl.load(row + F_STEP).to(tl.pointer_type(tl.int64)))
    kk = tl.cast(k, tl.int64)
    return (((step + 1) % kk) == 0) & (tl.load(row + F_ROLE) >= ROLE_EMBEDDING) & (tl.load(row + F_GIVEN_SUMSQ) < 0)


@triton.jit(do_not_specialize=["k"])
def tiger_sumsq_kernel(
    tensors, blocks, k,
    row_sumsq, blk,                        # fp64: sums of rows whole in a block; block partials
    P_DT: tl.constexpr, ALIGNED: tl.constexpr, BLOCK: tl.constexpr, LOG2_BLOCK: tl.constexpr,
):
    """Pass 1b, over the update's blocks: the partial sums of squares of θ where this call
    needs an RMS (NOTE: [Triton sums of squares]: the very partials the update's SUMSQ pass
    writes for the next call)."""
    bi, ti, start, row = _block_task(tensors, blocks, ALIGNED, BLOCK)
    if _needs_sums(row, k):
        rem = tl.load(row + F_NUMEL) - start
        p_ptr = _typed_ptr(tl.load(row + F_PARAM), P_DT, ALIGNED) + start
        offs = tl.arange(0, BLOCK)
        if rem >= BLOCK:
            x = _ld(p_ptr, offs, None, P_DT)
        else:
            x = _ld(p_ptr, offs, offs < rem.to(tl.int32), P_DT)
        _block_sums(x, tl.minimum(rem, BLOCK), bi, start, tl.load(row + F_ROWLEN),
                    tl.load(row + F_ROLE) == ROLE_EMBEDDING, row_sumsq + tl.load(row + F_SLOT), blk,
                    LOG2_BLOCK, BLOCK)


@triton.jit(do_not_specialize=["k"])
def tiger_finish_kernel(
    tensors, row_nan, row_sumsq, blk, k,
    t_nan, t_rms, row_rms, t_sumsq,        # t_sumsq: fp64 per tensor, the matrix sums used
    stats,                                 # fp64 given statistics (NOTE: [Tiger statistics input])
    BLOCK: tl.constexpr, LOG2: tl.constexpr, UBLOCK: tl.constexpr,
):
    """Pass 2, one program per tensor, fixed order (deterministic): NaN flag, whole-tensor
    RMS (matrix role) and per-row RMS (embedding role), rms = fp32(sqrt(sumsq / n)) in fp64,
    the sums combined from pass 1b's partials (NOTE: [Triton sums of squares]). Where the table
    gives an index into ``stats`` (sharded tensors, cached sums), the given NaN count and sums
    of squares of the whole tensor replace this call's own."""
    ti = tl.program_id(0).to(tl.int64)
    row = tensors + ti * NFIELDS
    numel = tl.load(row + F_NUMEL)
    row_len = tl.load(row + F_ROWLEN)
    nrows = tl.load(row + F_NROWS)
    slot = tl.load(row + F_SLOT)
    role = tl.load(row + F_ROLE)
    blk0 = tl.load(row + F_BLK0)
    at_nan = tl.load(row + F_GIVEN_NAN)
    at_sq = tl.load(row + F_GIVEN_SUMSQ)
    given_n = tl.load(row + F_GIVEN_N).to(tl.float64)
    need = _needs_sums(row, k)
    nan = tl.zeros([BLOCK], dtype=tl.int32)
    for r0 in range(0, nrows, BLOCK):
        r = r0 + tl.arange(0, BLOCK).to(tl.int64)
        f = tl.load(row_nan + slot + r, mask=r < tl.where(at_nan < 0, nrows, 0), other=0)  # NOTE: [scalar masks]
        nan = tl.maximum(nan, (f != 0).to(tl.int32))  # NOTE: [NaN flags]: OR, never a sum
    if role == ROLE_EMBEDDING:
        given_rows = at_sq >= 0
        row_n = tl.where(given_rows, given_n, row_len.to(tl.float64))
        for r0 in range(0, nrows, BLOCK):
            r = r0 + tl.arange(0, BLOCK).to(tl.int64)
            ok = r < nrows
            ok_need = r < tl.where(need, nrows, 0)  # NOTE: [scalar masks]
            cross, s_cross = _crossing_rows(blk, blk0, r, ok_need, row_len, UBLOCK)
            s = tl.load(row_sumsq + slot + r, mask=ok_need & (~cross), other=0.0)
            s = tl.where(cross, s_cross, s)
            tl.store(row_sumsq + slot + r, s, mask=cross)  # every row's sum in row_sumsq from here
            # NOTE: [scalar masks] the interpreter takes no mask made of a vector and a scalar
            # condition: the scalar goes into the bound (r < nrows or r < 0).
            s_given = tl.load(stats + tl.maximum(at_sq, 0) + r, mask=r < tl.where(given_rows, nrows, 0), other=0.0)
            s = tl.where(given_rows, s_given, s)
            tl.store(row_rms + slot + r, tl.sqrt(s / row_n).to(tl.float32), mask=ok)
    own_nan = tl.max(nan, axis=0) > 0
    given_nan = tl.load(stats + tl.maximum(at_nan, 0)) != 0.0
    tl.store(t_nan + ti, tl.where(at_nan >= 0, given_nan, own_nan).to(tl.int32))
    total = tl.cast(0.0, tl.float64)
    if need & (role == ROLE_MATRIX):
        total = _matrix_total(blk, blk0, (numel + UBLOCK - 1) // UBLOCK, BLOCK, LOG2)
    total = tl.where(at_sq >= 0, tl.load(stats + tl.maximum(at_sq, 0)), total)
    tl.store(t_sumsq + ti, total)
    n = tl.where(at_sq >= 0, given_n, tl.maximum(numel, 1).to(tl.float64))
    tl.store(t_rms + ti, tl.sqrt(total / n).to(tl.float32))


@triton.jit(do_not_specialize=["k"])
def tiger_sumsq_out_kernel(
    tensors, blk, t_nan, found_ptr, k, sumsq_out,
    HAS_FOUND: tl.constexpr, BLOCK: tl.constexpr, LOG2: tl.constexpr, UBLOCK: tl.constexpr,
):
    """After the SUMSQ update, one program per tensor: the sums out that span blocks (a
    matrix's total, embedding rows over several blocks) from the update's partials, combined as
    ``tiger_finish_kernel`` combines the pre-pass's (NOTE: [Triton sums of squares]); rows whole
    in a block were written by the update itself."""
    ti = tl.program_id(0).to(tl.int64)
    row = tensors + ti * NFIELDS
    out_at = tl.load(row + F_OUT_AT)
    step = tl.load(tl.load(row + F_STEP).to(tl.pointer_type(tl.int64)))
    written = (tl.load(t_nan + ti) != 0) | (((step + 1) % tl.cast(k, tl.int64)) == 0)
    if HAS_FOUND:
        written = written & (tl.load(found_ptr).to(tl.float32) == 0.0)
    if (out_at >= 0) & (written | (tl.load(row + F_OUT_KEPT) == 0)):
        numel = tl.load(row + F_NUMEL)
        blk0 = tl.load(row + F_BLK0)
        if tl.load(row + F_ROLE) == ROLE_EMBEDDING:
            row_len = tl.load(row + F_ROWLEN)
            nrows = tl.load(row + F_NROWS)
            for r0 in range(0, nrows, BLOCK):
                r = r0 + tl.arange(0, BLOCK).to(tl.int64)
                cross, s = _crossing_rows(blk, blk0, r, r < nrows, row_len, UBLOCK)
                tl.store(sumsq_out + out_at + r, s, mask=cross)
        else:
            tl.store(sumsq_out + out_at, _matrix_total(blk, blk0, (numel + UBLOCK - 1) // UBLOCK, BLOCK, LOG2))


# ------------------------------------------------------------------ the norm pass (sumsq_)
# NOTE: [Triton norm sums] ``sumsq_`` (NOTE: [clipping inside the step] in sign_kernels/_ops.py):
# out[i] = sum over tensor i of (fp32(x) / scale)**2, each square in fp64 from the fp32
# quotient (exact), summed in an order fixed by the tensor's numel alone: the tensor is cut into
# blocks of BLOCK elements from element 0; ``sumsq_blocks_kernel`` sums each block by the
# pairwise tree ``_tree_sum`` (zeros past the end: adding 0 is exact) into part[bi]; then
# ``sumsq_total_kernel`` (one program per tensor) adds the tensor's block partials in
# ``_matrix_total``'s order (pairwise trees over runs of FINISH_BLOCK partials, added in order). BLOCK
# and FINISH_BLOCK are the launcher's constants, never chosen per call, and where a partial is
# stored (F_BLK0) does not change the order it is added in, so neither the other tensors of the
# call nor the split between aligned and unaligned launches changes a bit. NaN propagates through the
# adds; +inf + finite = +inf (squares are never negative, so no inf - inf); an empty tensor
# has no block and gets 0.
@triton.jit
def sumsq_blocks_kernel(
    tensors, blocks, scale_ptr, part,      # part: fp64, one partial per block (bi)
    DT: tl.constexpr, HAS_SCALE: tl.constexpr, ALIGNED: tl.constexpr,
    BLOCK: tl.constexpr, LOG2_BLOCK: tl.constexpr,
):
    bi, ti, start, row = _block_task(tensors, blocks, ALIGNED, BLOCK)  # part starts at the launch's first block
    rem = tl.load(row + F_NUMEL) - start
    x_ptr = _typed_ptr(tl.load(row + F_PARAM), DT, ALIGNED) + start
    offs = tl.arange(0, BLOCK)
    if rem >= BLOCK:
        x = _ld(x_ptr, offs, None, DT)
    else:
        x = _ld(x_ptr, offs, offs < rem.to(tl.int32), DT)
    if HAS_SCALE:
        x = tl.math.div_rn(x, tl.load(scale_ptr).to(tl.float32))
    xd = x.to(tl.float64)
    sq = tl.where(offs < tl.minimum(rem, BLOCK).to(tl.int32), xd * xd, 0.0)
    tl.store(part + bi, _tree_sum(sq, LOG2_BLOCK))


@triton.jit
def sumsq_total_kernel(
    tensors, part, out,                    # out: fp64, one sum per tensor
    BLOCK: tl.constexpr, LOG2: tl.constexpr, UBLOCK: tl.constexpr,
):
    ti = tl.program_id(0).to(tl.int64)
    row = tensors + ti * NFIELDS
    nblk = (tl.load(row + F_NUMEL) + UBLOCK - 1) // UBLOCK
    blk0 = tl.load(row + F_BLK0)
    # _matrix_total's order over one partial per block (it reads Tiger's two per block).
    total = tl.zeros([1], dtype=tl.float64)
    for c0 in range(0, nblk, BLOCK):
        b = c0 + tl.arange(0, BLOCK).to(tl.int64)
        v = tl.load(part + blk0 + b, mask=b < nblk, other=0.0)
        total = total + _tree_sum(v, LOG2)
    tl.store(out + ti, tl.sum(total, axis=0))
