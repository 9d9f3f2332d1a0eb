"""Compile every Triton kernel specialisation the backend can launch for an sm_90 GPU, on a
machine without one, and report registers, spills and 16-byte global accesses.

    TRITON_INTERPRET=0 python tests/triton_codegen.py [--all] [--jobs N]   # one JSON line per kernel

``triton.compile`` with ``GPUTarget("cuda", 90, 32)`` lowers to PTX and runs Triton's bundled
ptxas; the cubin's resource usage comes from the bundled ``cuobjdump``. The specialisations
are the launcher's own: ``_launch.dtype_error`` says which dtype combinations run and
``_launch.step_config`` / ``rows_config`` / ``finish_config`` give the constexprs and options
``_launch.run`` passes. By default the update kernel is compiled with its optional scalar
inputs (lr_t, grad_scale, found_inf, clip) all absent and all present (they only add scalar code;
grad_scale adds a division and clip a product per element, so "all present" is the widest); ``--all`` compiles
every combination of them (about 5x as many kernels). Used by tests/test_triton_codegen.py,
which runs it in a subprocess because triton picks interpreter or compiler once per process.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor

os.environ["TRITON_INTERPRET"] = "0"
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.int16)
SM = 90

# Pointer arguments: every one a torch allocation or a slice of the plan's int64 table at a
# 16-byte multiple (see _launch._build_plan), so Triton's JIT marks them divisible by 16.
_TYPE = {torch.float32: "*fp32", torch.float64: "*fp64", torch.int32: "*i32", torch.int64: "*i64"}


def _dt(code_or_dtype) -> str:
    return str(code_or_dtype).replace("torch.", "")


def step_specs(all_flags: bool):
    from sign_kernels.triton import _launch as L

    flag_sets = list(itertools.product((False, True), repeat=4)) if all_flags else \
        [(False, False, False, False), (True, True, True, True)]
    for algo in (L.ALGO_LION, L.ALGO_TIGER, L.ALGO_SIMBA):
        for pdt, gdt, sdt in itertools.product(DTYPES, repeat=3):
            if L.dtype_error(algo, pdt, gdt, sdt) is not None:
                continue
            srs = (False, True) if torch.bfloat16 in (pdt, sdt) else (False,)
            sums = (False, True) if algo == L.ALGO_TIGER else (False,)
            for sr, aligned, sumsq in itertools.product(srs, (True, False), sums):
                for lr_t, scale, found, clip in (flag_sets if aligned else [(True, True, True, True)]):
                    cfg = L.step_config(algo, pdt, gdt, sdt, has_lr_t=lr_t, has_scale=scale,
                                        has_found=found, sr=sr, aligned=aligned, sumsq=sumsq,
                                        has_clip=clip)
                    sig = dict(tensors="*i64", blocks="*i64", lr="fp32",
                               lr_t="*fp32" if lr_t else "*i64",
                               scale_ptr="*fp32" if scale else "*i64",
                               found_ptr="*fp32" if found else "*i64",
                               clip_ptr="*fp32" if clip else "*i64",
                               weight_decay="fp32", beta1="fp32", beta2="fp32", shrink="fp32",
                               k="i32", window="i32", threshold="i32",
                               t_nan="*i32" if algo == L.ALGO_TIGER else "*i64",
                               t_rms="*fp32" if algo == L.ALGO_TIGER else "*i64",
                               row_rms="*fp32" if algo == L.ALGO_TIGER else "*i64",
                               blk="*fp64" if algo == L.ALGO_TIGER else "*i64",
                               sumsq_out="*fp64" if sumsq else "*i64")
                    name = (f"sign_step_kernel[{L._ALGO_NAME[algo]} p={_dt(pdt)} g={_dt(gdt)} "
                            f"m={_dt(sdt)} sr={int(sr)} aligned={int(aligned)} lr_t={int(lr_t)} "
                            f"scale={int(scale)} found={int(found)} clip={int(clip)}"
                            + (" sumsq=1]" if sumsq else "]"))
                    # 16-byte vectors a thread needs per buffer in the full-block path
                    per_thread = cfg["BLOCK"] // (32 * cfg["num_warps"])
                    reads = [pdt, gdt, sdt]
                    writes = [pdt, sdt]
                    yield dict(kernel="sign_step_kernel", name=name, sig=sig, cfg=cfg,
                               aligned=aligned,
                               min_v4_loads=sum(per_thread * d.itemsize // 16 for d in reads),
                               min_v4_stores=sum(per_thread * d.itemsize // 16 for d in writes))
                    if algo != L.ALGO_SIMBA and pdt in (torch.bfloat16, torch.float16) and not sr:
                        # the correction byte (NOTE: [correction byte]): ρ read and written with θ
                        cfg = L.step_config(algo, pdt, gdt, sdt, has_lr_t=lr_t, has_scale=scale,
                                            has_found=found, sr=False, aligned=aligned, sumsq=sumsq,
                                            has_clip=clip, ec=True)
                        per_thread = cfg["BLOCK"] // (32 * cfg["num_warps"])  # 16 warps: 4 elements
                        yield dict(kernel="sign_step_kernel", name=name[:-1] + " ec=1]", sig=sig, cfg=cfg,
                                   aligned=aligned,
                                   min_v4_loads=sum(per_thread * d.itemsize // 16 for d in reads),
                                   min_v4_stores=sum(per_thread * d.itemsize // 16 for d in writes))


def q8_specs(all_flags: bool):
    """``sign_q8_kernel`` (int8 momentum, NOTE: [int8 momentum]): Lion and Tiger, every param and
    grad dtype, SR (bf16 params), the correction byte (16-bit params), both alignments."""
    from sign_kernels.triton import _launch as L

    flag_sets = list(itertools.product((False, True), repeat=4)) if all_flags else \
        [(False, False, False, False), (True, True, True, True)]
    for algo in (L.ALGO_LION, L.ALGO_TIGER):
        for pdt in (torch.float32, torch.bfloat16, torch.float16):
            for gdt in dict.fromkeys((pdt, torch.float32)):
                ecs = (False, True) if pdt != torch.float32 else (False,)
                for ec, aligned in itertools.product(ecs, (True, False)):
                    srs = (False, True) if pdt == torch.bfloat16 and not ec else (False,)
                    for sr in srs:
                        for lr_t, scale, found, clip in (flag_sets if aligned else [(True, True, True, True)]):
                            cfg = L.q8_config(algo, pdt, gdt, has_lr_t=lr_t, has_scale=scale, has_found=found,
                                              sr=sr, ec=ec, aligned=aligned, has_clip=clip)
                            tiger = algo == L.ALGO_TIGER
                            sig = dict(tensors="*i64", qtasks="*i64", lr="fp32",
                                       lr_t="*fp32" if lr_t else "*i64",
                                       scale_ptr="*fp32" if scale else "*i64",
                                       found_ptr="*fp32" if found else "*i64",
                                       clip_ptr="*fp32" if clip else "*i64",
                                       weight_decay="fp32", beta1="fp32", beta2="fp32", shrink="fp32", k="i32",
                                       t_nan="*i32" if tiger else "*i64", t_rms="*fp32" if tiger else "*i64",
                                       row_rms="*fp32" if tiger else "*i64")
                            name = (f"sign_q8_kernel[{L._ALGO_NAME[algo]} p={_dt(pdt)} g={_dt(gdt)} m=int8 "
                                    f"ec={int(ec)} sr={int(sr)} aligned={int(aligned)} lr_t={int(lr_t)} "
                                    f"scale={int(scale)} found={int(found)} clip={int(clip)}]")
                            # the whole-block path: a thread's share of the contiguous tile
                            per_thread = cfg["QROWS"] * 64 // (32 * cfg["num_warps"])
                            yield dict(kernel="sign_q8_kernel", name=name, sig=sig, cfg=cfg, aligned=aligned,
                                       min_v4_loads=sum(per_thread * d.itemsize // 16 for d in (pdt, gdt)),
                                       min_v4_stores=per_thread * pdt.itemsize // 16)


def stats_specs():
    from sign_kernels.triton import _launch as L

    pairs = sorted({(p, g) for p, g, m in itertools.product(DTYPES, repeat=3)
                    if L.dtype_error(L.ALGO_TIGER, p, g, m) is None}, key=str)
    for gdt, scale, aligned in itertools.product(sorted({g for _, g in pairs}, key=str), (False, True),
                                                 (True, False)):
        clip = scale  # grad_scale and clip absent, or both present (the widest)
        cfg = L.rows_config(gdt, has_scale=scale, aligned=aligned, has_clip=clip)
        sig = dict(tensors="*i64", tasks="*i64", scale_ptr="*fp32" if scale else "*i64",
                   clip_ptr="*fp32" if clip else "*i64", row_nan="*i32")
        per_thread = cfg["ROWS"] * cfg["COLS"] // (32 * cfg["num_warps"])
        yield dict(kernel="tiger_rows_kernel", sig=sig, cfg=cfg, aligned=aligned,
                   name=f"tiger_rows_kernel[g={_dt(gdt)} scale={int(scale)} clip={int(clip)} aligned={int(aligned)}]",
                   min_v4_loads=per_thread * gdt.itemsize // 16, min_v4_stores=0)
    # NOTE: [Triton sums of squares]: the pre-pass over θ, on the update's blocks.
    for pdt, aligned in itertools.product(sorted({p for p, _ in pairs}, key=str), (True, False)):
        cfg = L.sumsq_config(pdt, aligned=aligned)
        per_thread = cfg["BLOCK"] // (32 * cfg["num_warps"])
        yield dict(kernel="tiger_sumsq_kernel", cfg=cfg, aligned=aligned,
                   sig=dict(tensors="*i64", blocks="*i64", k="i32", row_sumsq="*fp64", blk="*fp64"),
                   name=f"tiger_sumsq_kernel[p={_dt(pdt)} aligned={int(aligned)}]",
                   min_v4_loads=per_thread * pdt.itemsize // 16, min_v4_stores=0)
    yield dict(kernel="tiger_finish_kernel", name="tiger_finish_kernel", cfg=L.finish_config(),
               sig=dict(tensors="*i64", row_nan="*i32", row_sumsq="*fp64", blk="*fp64", k="i32",
                        t_nan="*i32", t_rms="*fp32", row_rms="*fp32", t_sumsq="*fp64", stats="*fp64"),
               aligned=False, min_v4_loads=0, min_v4_stores=0)
    # The norm pass (sumsq_, NOTE: [Triton norm sums]): block partials, then one program per tensor.
    for dt, scale, aligned in itertools.product((torch.bfloat16, torch.float16, torch.float32), (False, True),
                                                (True, False)):
        cfg = L.norm_config(dt, has_scale=scale, aligned=aligned)
        per_thread = cfg["BLOCK"] // (32 * cfg["num_warps"])
        yield dict(kernel="sumsq_blocks_kernel", cfg=cfg, aligned=aligned,
                   sig=dict(tensors="*i64", blocks="*i64", scale_ptr="*fp32" if scale else "*i64", part="*fp64"),
                   name=f"sumsq_blocks_kernel[x={_dt(dt)} scale={int(scale)} aligned={int(aligned)}]",
                   min_v4_loads=per_thread * dt.itemsize // 16, min_v4_stores=0)
    yield dict(kernel="sumsq_total_kernel", name="sumsq_total_kernel", cfg=L.norm_total_config(),
               sig=dict(tensors="*i64", part="*fp64", out="*fp64"), aligned=False, min_v4_loads=0, min_v4_stores=0)
    # Tiger with int8 momentum: its sums out read back from θ after the update.
    for pdt, found, aligned in itertools.product((torch.bfloat16, torch.float16, torch.float32), (False, True),
                                                 (True, False)):
        cfg = L.sums_after_config(pdt, has_found=found, aligned=aligned)
        per_thread = cfg["BLOCK"] // (32 * cfg["num_warps"])
        yield dict(kernel="tiger_sums_after_kernel", cfg=cfg, aligned=aligned,
                   sig=dict(tensors="*i64", blocks="*i64", t_nan="*i32", found_ptr="*fp32" if found else "*i64",
                            k="i32", blk="*fp64", sumsq_out="*fp64"),
                   name=f"tiger_sums_after_kernel[p={_dt(pdt)} found={int(found)} aligned={int(aligned)}]",
                   min_v4_loads=per_thread * pdt.itemsize // 16, min_v4_stores=0)
    for found in (False, True):
        yield dict(kernel="tiger_sumsq_out_kernel", name=f"tiger_sumsq_out_kernel[found={int(found)}]",
                   cfg=L.sumsq_out_config(has_found=found),
                   sig=dict(tensors="*i64", blk="*fp64", t_nan="*i32", found_ptr="*fp32" if found else "*i64",
                            k="i32", sumsq_out="*fp64"),
                   aligned=False, min_v4_loads=0, min_v4_stores=0)


_V4_LD = re.compile(r"^\s*(@%p\d+\s+)?ld\.global(\.\w+)*\.v4\.", re.M)
_V4_ST = re.compile(r"^\s*(@%p\d+\s+)?st\.global(\.\w+)*\.v4\.", re.M)
_LD = re.compile(r"^\s*(@%p\d+\s+)?ld\.global", re.M)
_ST = re.compile(r"^\s*(@%p\d+\s+)?st\.global", re.M)


def cuobjdump_path() -> str:
    import triton

    return triton.knobs.nvidia.cuobjdump.path


def compile_one(spec: dict) -> dict:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from sign_kernels.triton import _kernels as K

    fn = getattr(K, spec["kernel"])
    cfg = dict(spec["cfg"])
    options = {k: cfg.pop(k) for k in ("num_warps", "enable_fp_fusion", "maxnreg") if k in cfg}
    names = fn.arg_names
    sig = {n: spec["sig"].get(n, "constexpr") for n in names}
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n, t in spec["sig"].items()
             if t.startswith("*")}
    ck = triton.compile(ASTSource(fn, sig, cfg, attrs), target=GPUTarget("cuda", SM, 32),
                        options=options)
    ptx = ck.asm["ptx"]
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(ck.asm["cubin"])
        f.flush()
        res = subprocess.run([cuobjdump_path(), "--dump-resource-usage", f.name],
                             capture_output=True, text=True, check=True).stdout
    use = dict((k, int(v)) for k, v in re.findall(r"\b(REG|STACK|LOCAL|SHARED):(\d+)", res))
    out = {k: v for k, v in spec.items() if k not in ("sig", "cfg")}
    out.update(regs=use["REG"], stack=use["STACK"], local=use["LOCAL"], shared=use["SHARED"],
               v4_loads=len(_V4_LD.findall(ptx)), v4_stores=len(_V4_ST.findall(ptx)),
               loads=len(_LD.findall(ptx)), stores=len(_ST.findall(ptx)),
               num_warps=options["num_warps"])
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--all", action="store_true", help="every combination of the optional inputs")
    ap.add_argument("--jobs", type=int, default=min(4, os.cpu_count() or 1))
    ap.add_argument("--only", default="", help="compile only kernels whose name contains this")
    args = ap.parse_args(argv)
    specs = [s for s in list(step_specs(args.all)) + list(q8_specs(args.all)) + list(stats_specs())
             if args.only in s["name"]]
    with ProcessPoolExecutor(args.jobs) as pool:
        for r in pool.map(compile_one, specs):
            print(json.dumps(r), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
