"""The reference backend: plain torch, one tensor at a time, readable next to docs/rules.md.

It is the oracle of every test. It runs on any device and in any floating dtype:

* fp64 tensors are computed in fp64 with fp64 scalars (the test oracle);
* fp32/bf16/fp16 tensors are computed in fp32 ("opmath") with the scalars derived in
  fp32 exactly as ``csrc/core/sign_math.h`` derives them, each product and sum rounded
  separately (NOTE: [no contraction]), so on fp32 it matches the kernels bit for bit
  except for Tiger's RMS, whose summation order differs;
* results are written back to the storage dtype with round-to-nearest-even, or with
  the documented stochastic rounding (``sign_kernels._rng``) for bf16.

The functions have the op signatures of ``sign_kernels._ops``.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch

from .. import _quant, _rng

# Tiger roles, as in csrc/core/sign_math.h (TigerRole).
ROLE_ELEMENTWISE, ROLE_GAIN, ROLE_EMBEDDING, ROLE_MATRIX = 0, 1, 2, 3


def _opmath(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _scalar(value: float, dtype: torch.dtype, device) -> torch.Tensor:
    return torch.tensor(value, dtype=dtype, device=device)


def _lr(lr: float, lr_t: Optional[torch.Tensor], dtype, device) -> torch.Tensor:
    if lr_t is not None:
        return lr_t.detach().to(device=device, dtype=dtype).reshape(())
    return _scalar(lr, dtype, device)


def _skip(found_inf: Optional[torch.Tensor]) -> bool:
    return found_inf is not None and bool(found_inf.item() != 0)


def _grad(g: torch.Tensor, grad_scale: Optional[torch.Tensor], dtype, clip: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The gradient the rules use: (g / grad_scale) * clip, each rounded in ``dtype``, in that order
    (NOTE: [clipping inside the step] in sign_kernels/_ops.py)."""
    g = g.to(dtype)
    if grad_scale is not None:
        g = g / grad_scale.to(device=g.device, dtype=dtype)
    if clip is not None:
        g = g * clip.to(device=g.device, dtype=dtype)
    return g


def _sign(x: torch.Tensor) -> torch.Tensor:
    # NOTE: [sign]: +1, -1, and +0 for zeros and NaN (what torch.sign gives).
    return (x > 0).to(x.dtype) - (x < 0).to(x.dtype)


def _write(dst: torch.Tensor, value: torch.Tensor, seed: int, step: int, stream: int, sr: bool) -> None:
    if sr and dst.dtype == torch.bfloat16:
        key = _rng.sr_key(seed, step, stream)
        bits = _rng.sr_bits(key, value.numel(), value.device)
        dst.copy_(_rng.bf16_stochastic(value, bits))
    else:
        dst.copy_(value)


def lion_(
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    exp_avgs: Sequence[torch.Tensor],
    steps: Sequence[torch.Tensor],
    lr: float,
    lr_t: Optional[torch.Tensor],
    beta1: float,
    beta2: float,
    weight_decay: float,
    grad_scale: Optional[torch.Tensor],
    found_inf: Optional[torch.Tensor],
    seeds: Sequence[int],
    stochastic_rounding: bool,
    clip: Optional[torch.Tensor] = None,
    exp_avg_scales: Optional[Sequence[torch.Tensor]] = None,
    residuals: Optional[Sequence[torch.Tensor]] = None,
) -> None:
    _check_compressed(params, exp_avgs, exp_avg_scales, residuals, stochastic_rounding, "lion_")
    if _skip(found_inf):
        return
    for i, (p, g, m, step, seed) in enumerate(zip(params, grads, exp_avgs, steps, seeds)):
        dt, dev = _opmath(p.dtype), p.device
        t = int(step)
        lr_ = _lr(lr, lr_t, dt, dev)
        b1, b2, wd = (_scalar(v, dt, dev) for v in (beta1, beta2, weight_decay))
        one = _scalar(1.0, dt, dev)
        p_, m_, g_ = _read_param(p, residuals, i, dt), _read_momentum(m, exp_avg_scales, i, dt), _grad(g, grad_scale, dt, clip)
        c = b1 * m_ + (one - b1) * g_
        p_new = p_ * (one - lr_ * wd) - lr_ * _sign(c)
        m_new = b2 * m_ + (one - b2) * g_
        _write_param(p, p_new, residuals, i, seed, t, stochastic_rounding)
        _write_momentum(m, m_new, exp_avg_scales, i, seed, t, stochastic_rounding)


def _check_compressed(params, exp_avgs, scales, residuals, sr, op) -> None:
    """8-bit momentum (int8 codes + bf16 block scales) and the correction byte: their lists."""
    int8 = any(m.dtype == torch.int8 for m in exp_avgs)
    if int8 != (scales is not None):
        raise ValueError(f"{op}: int8 momentum and exp_avg_scales are given together or not at all")
    if scales is not None:
        if len(scales) != len(exp_avgs) or not all(m.dtype == torch.int8 for m in exp_avgs):
            raise ValueError(f"{op}: exp_avg_scales needs one bf16 scale tensor per int8 momentum")
        for i, (m, sc) in enumerate(zip(exp_avgs, scales)):
            if m.dim() < 2 or sc.dtype != torch.bfloat16 or tuple(sc.shape) != _quant.scale_shape(m.shape):
                raise ValueError(f"{op}: tensor {i}: int8 momentum needs >= 2 dims and bf16 scales of shape "
                                 f"{_quant.scale_shape(m.shape) if m.dim() >= 2 else '?'}, got {m.dim()} dims and "
                                 f"{sc.dtype} {tuple(sc.shape)}")
    if residuals is not None:
        if sr:
            raise ValueError(f"{op}: residuals (the correction byte) and stochastic_rounding are exclusive")
        if len(residuals) != len(params):
            raise ValueError(f"{op}: residuals needs one int8 tensor per param")
        for i, (p, r) in enumerate(zip(params, residuals)):
            if p.dtype not in (torch.bfloat16, torch.float16) or r.dtype != torch.int8 or r.shape != p.shape:
                raise ValueError(f"{op}: tensor {i}: the correction byte needs bf16/fp16 params and an int8 "
                                 f"residual of their shape, got {p.dtype} and {r.dtype} {tuple(r.shape)}")


def _read_param(p, residuals, i, dt):
    return _quant.ec_decode(p, residuals[i]) if residuals is not None else p.to(dt)


def _read_momentum(m, scales, i, dt):
    return _quant.dequantize(m, scales[i]) if scales is not None else m.to(dt)


def _write_param(p, value, residuals, i, seed, t, sr) -> None:
    if residuals is not None:
        v, rho = _quant.ec_encode(value.to(torch.float32), p.dtype)
        p.copy_(v)
        residuals[i].copy_(rho)
    else:
        _write(p, value, seed, t, _rng.STREAM_PARAM, sr)


def _write_momentum(m, value, scales, i, seed, t, sr) -> None:
    if scales is not None:
        codes, scale = _quant.quantize(value.to(torch.float32), _quant.state_key(seed, t))
        m.copy_(codes)
        scales[i].copy_(scale)
    else:
        _write(m, value, seed, t, _rng.STREAM_STATE, sr)


def tiger_rms(p: torch.Tensor, role: int) -> torch.Tensor:
    """RMS of the whole tensor (matrix role) or of each row over the last dim (embedding)."""
    x = p.detach().to(torch.float64)
    if role == ROLE_EMBEDDING:
        x = x.reshape(-1, p.shape[-1]) if p.dim() > 0 else x.reshape(1, 1)
        n = x.shape[1]
        return torch.sqrt(x.square().sum(dim=1, keepdim=True) / max(n, 1))
    return torch.sqrt(x.square().sum() / max(x.numel(), 1))


def _check_tiger_stats(params, roles, stats, stats_nan, stats_sumsq, stats_n) -> bool:
    """Whether Tiger's statistics are given (all four arguments, or none)."""
    given = [a is not None for a in (stats, stats_nan, stats_sumsq, stats_n)]
    if not any(given):
        return False
    if not all(given):
        raise ValueError("tiger_: stats, stats_nan, stats_sumsq and stats_n are given together or not at all")
    if stats.dtype != torch.float64 or stats.dim() != 1:
        raise ValueError(f"tiger_: stats must be a 1-D float64 tensor, got {stats.dtype} of shape {tuple(stats.shape)}")
    n, length = len(params), stats.numel()
    for name, lst in (("stats_nan", stats_nan), ("stats_sumsq", stats_sumsq), ("stats_n", stats_n)):
        if len(lst) != n:
            raise ValueError(f"tiger_: {name} has {len(lst)} entries for {n} params")
    for i, p in enumerate(params):
        rows = p.numel() // p.shape[-1] if roles[i] == ROLE_EMBEDDING and p.dim() and p.shape[-1] else 1
        if not -1 <= stats_nan[i] < length:
            raise ValueError(f"tiger_: stats_nan[{i}] = {stats_nan[i]} is neither -1 nor an index of stats (numel {length})")
        if stats_sumsq[i] < -1 or (stats_sumsq[i] >= 0 and stats_sumsq[i] + rows > length):
            raise ValueError(f"tiger_: stats_sumsq[{i}] = {stats_sumsq[i]} is neither -1 nor the start of {rows} "
                             f"entries of stats (numel {length})")
        if stats_sumsq[i] >= 0 and stats_n[i] < 1:
            raise ValueError(f"tiger_: stats_n[{i}] must be >= 1 where stats_sumsq[{i}] >= 0, got {stats_n[i]}")
    return True


def _check_sumsq_out(params, roles, sumsq_out, sumsq_out_at) -> bool:
    """Whether Tiger's sums of squares out are wanted (NOTE: [Tiger sums of squares out])."""
    if sumsq_out is None and sumsq_out_at is None:
        return False
    if sumsq_out is None or sumsq_out_at is None:
        raise ValueError("tiger_: sumsq_out and sumsq_out_at are given together or not at all")
    if sumsq_out.dtype != torch.float64 or sumsq_out.dim() != 1:
        raise ValueError(f"tiger_: sumsq_out must be a 1-D float64 tensor, got {sumsq_out.dtype} of shape "
                         f"{tuple(sumsq_out.shape)}")
    if len(sumsq_out_at) != len(params):
        raise ValueError(f"tiger_: sumsq_out_at has {len(sumsq_out_at)} entries for {len(params)} params")
    for i, p in enumerate(params):
        rows = p.numel() // p.shape[-1] if roles[i] == ROLE_EMBEDDING and p.dim() and p.shape[-1] else 1
        at = sumsq_out_at[i]
        if at < -1 or (at >= 0 and at + rows > sumsq_out.numel()):
            raise ValueError(f"tiger_: sumsq_out_at[{i}] = {at} is neither -1 nor the start of {rows} entries of "
                             f"sumsq_out (numel {sumsq_out.numel()})")
    return True


def tiger_sumsq(p: torch.Tensor, role: int) -> torch.Tensor:
    """The fp64 sums of squares behind :func:`tiger_rms`: one (matrix) or one per row (embedding)."""
    x = p.detach().to(torch.float64)
    if role == ROLE_EMBEDDING:
        return x.reshape(-1, p.shape[-1]).square().sum(dim=1)
    return x.square().sum().reshape(1)


def _given_rms(p: torch.Tensor, role: int, stats: torch.Tensor, at: int, n: int) -> torch.Tensor:
    """RMS from sums of squares given in ``stats`` (fp64), in the layout of tiger_rms."""
    if role == ROLE_EMBEDDING:
        rows = p.numel() // p.shape[-1]
        s = stats[at:at + rows].to(device=p.device).reshape(rows, 1)
    else:
        s = stats[at].to(device=p.device)
    return torch.sqrt(s / float(n))


def tiger_(
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    exp_avgs: Sequence[torch.Tensor],
    steps: Sequence[torch.Tensor],
    roles: Sequence[int],
    lr: float,
    lr_t: Optional[torch.Tensor],
    beta: float,
    weight_decay: float,
    grad_accum_steps: int,
    shrink_ratio: float,
    grad_scale: Optional[torch.Tensor],
    found_inf: Optional[torch.Tensor],
    seeds: Sequence[int],
    stochastic_rounding: bool,
    stats: Optional[torch.Tensor] = None,
    stats_nan: Optional[Sequence[int]] = None,
    stats_sumsq: Optional[Sequence[int]] = None,
    stats_n: Optional[Sequence[int]] = None,
    sumsq_out: Optional[torch.Tensor] = None,
    sumsq_out_at: Optional[Sequence[int]] = None,
    clip: Optional[torch.Tensor] = None,
    exp_avg_scales: Optional[Sequence[torch.Tensor]] = None,
    residuals: Optional[Sequence[torch.Tensor]] = None,
) -> None:
    _check_compressed(params, exp_avgs, exp_avg_scales, residuals, stochastic_rounding, "tiger_")
    ext = _check_tiger_stats(params, roles, stats, stats_nan, stats_sumsq, stats_n)
    out = _check_sumsq_out(params, roles, sumsq_out, sumsq_out_at)
    if out:
        # NOTE: [Tiger sums of squares out]: after the call the wanted entries describe θ as the
        # call leaves it. Here, after each tensor's update (or at once for a skipped step), from
        # θ with the expressions of tiger_rms, unless they are the given sums in place and θ is
        # not written.
        def fill(i: int, p: torch.Tensor, written: bool) -> None:
            at = sumsq_out_at[i]
            if at < 0 or roles[i] not in (ROLE_MATRIX, ROLE_EMBEDDING) or p.numel() == 0:
                return
            if not written and ext and stats is sumsq_out and stats_sumsq[i] == at:
                return
            sums = tiger_sumsq(p, roles[i])
            sumsq_out[at:at + sums.numel()].copy_(sums)
    else:
        def fill(i: int, p: torch.Tensor, written: bool) -> None:
            pass
    if _skip(found_inf):
        for i, p in enumerate(params):
            fill(i, p, False)
        return
    k = int(grad_accum_steps)
    for i, (p, g, m, step, role, seed) in enumerate(zip(params, grads, exp_avgs, steps, roles, seeds)):
        if p.numel() == 0:
            continue
        dt, dev = _opmath(p.dtype), p.device
        t = int(step)
        elementwise = role in (ROLE_ELEMENTWISE, ROLE_GAIN)
        one = _scalar(1.0, dt, dev)
        beta_ = _scalar(beta, dt, dev)
        p_, m_, g_ = _read_param(p, residuals, i, dt), _read_momentum(m, exp_avg_scales, i, dt), _grad(g, grad_scale, dt, clip)
        if ext and stats_nan[i] >= 0:  # NOTE: [Tiger statistics input] in sign_kernels/_ops.py
            nan = bool(stats[stats_nan[i]] != 0)
        else:
            nan = bool(torch.isnan(g_).any())
        if nan:
            # NaN guard: leave m, shrink p towards its init centre.
            centre = _scalar(1.0 if role == ROLE_GAIN else 0.0, dt, dev)
            p_new = (p_ - centre) * _scalar(shrink_ratio, dt, dev) + centre
            _write_param(p, p_new, residuals, i, seed, t, stochastic_rounding)
            fill(i, p, True)
            continue
        b1 = beta_ if t % k == 0 else one
        coef = (one - beta_) / _scalar(float(k), dt, dev)
        m_new = b1 * m_ + coef * g_
        if (t + 1) % k == 0:
            lr_ = _lr(lr, lr_t, dt, dev)
            if elementwise:
                lr_p = _scalar(0.5, dt, dev) * lr_
                wd_p = _scalar(0.0, dt, dev)
            else:
                if ext and stats_sumsq[i] >= 0:
                    rms = _given_rms(p, role, stats, stats_sumsq[i], stats_n[i]).to(dt)
                else:
                    rms = tiger_rms(p, role).to(dt)
                if role == ROLE_EMBEDDING:
                    rms = rms.reshape(p.shape[:-1] + (1,))
                lr_p = lr_ * rms
                wd_p = _scalar(weight_decay, dt, dev)
            p_new = p_ - lr_p * (_sign(m_new) + wd_p * p_)
            _write_param(p, p_new, residuals, i, seed, t, stochastic_rounding)
        _write_momentum(m, m_new, exp_avg_scales, i, seed, t, stochastic_rounding)
        fill(i, p, (t + 1) % k == 0)


def simba_(
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    sign_counts: Sequence[torch.Tensor],
    steps: Sequence[torch.Tensor],
    lr: float,
    lr_t: Optional[torch.Tensor],
    window_size: int,
    threshold_count: int,
    weight_decay: float,
    grad_scale: Optional[torch.Tensor],
    found_inf: Optional[torch.Tensor],
    seeds: Sequence[int],
    stochastic_rounding: bool,
    clip: Optional[torch.Tensor] = None,
) -> None:
    if _skip(found_inf):
        return
    for p, g, s, step, seed in zip(params, grads, sign_counts, steps, seeds):
        dt, dev = _opmath(p.dtype), p.device
        t = int(step)
        lr_ = _lr(lr, lr_t, dt, dev)
        one = _scalar(1.0, dt, dev)
        p_, g_ = p.to(dt), _grad(g, grad_scale, dt, clip)
        cnt = s.to(torch.int32)
        sg = _sign(g_)
        u = torch.where(cnt.abs() > threshold_count, _sign(cnt.to(dt)), sg)
        p_new = p_ * (one - lr_ * _scalar(weight_decay, dt, dev))
        p_new = p_new - lr_ * u
        cnt = (cnt + sg.to(torch.int32)).clamp(-window_size, window_size)
        _write(p, p_new, seed, t, _rng.STREAM_PARAM, stochastic_rounding)
        s.copy_(cnt.to(torch.int16))


def sumsq_(tensors: Sequence[torch.Tensor], scale: Optional[torch.Tensor], out: torch.Tensor) -> None:
    """The norm pass (NOTE: [clipping inside the step] in sign_kernels/_ops.py): out[i] = the fp64
    sum of (x / scale)**2 over tensor i, the quotient rounded in the tensor's opmath dtype (fp32;
    fp64 for fp64 tensors, the tests' oracle) and squared in fp64. The order is fixed by the
    tensor's length: numpy's pairwise sum on CPU (torch's CPU sum splits by thread count), torch's
    sum on a GPU (its reduction tree depends on the size only)."""
    if out.dtype != torch.float64 or out.dim() != 1 or out.numel() != len(tensors):
        raise ValueError(f"sumsq_: out must be a 1-D float64 tensor of {len(tensors)} entries, got {out.dtype} "
                         f"of shape {tuple(out.shape)}")
    for i, x in enumerate(tensors):
        sq = _grad(x.detach().reshape(-1), scale, _opmath(x.dtype)).to(torch.float64).square()
        if sq.device.type == "cpu":
            total = torch.tensor(float(sq.numpy().sum()) if sq.numel() else 0.0, dtype=torch.float64)
        else:
            total = sq.sum()
        out[i] = total.to(out.device)


def threshold_count(window_size: int, threshold: float) -> int:
    """T = int(window_size * threshold) (docs/rules.md, Simba)."""
    return int(math.floor(window_size * threshold))
