"""Audit compiled sign_kernels modules: torch's stable ABI and CPython's limited API only.

    python scripts/abi_audit.py [--torch-lib DIR] [--python-min 3.10] WHEEL_OR_SO...

Reads each .whl (every .so inside it) or .so with binutils (`nm -D`, `readelf -d`, `c++filt`)
and fails (exit 1, listing every violation) unless, for each module:

* torch (NOTE: [stable ABI] in csrc/torch/stable.h): no undefined C++ symbol names at::, c10::
  or torch:: (torch::stable and torch::headeronly are header-only, so an undefined one is a
  violation too), and every undefined symbol that torch's libraries export (those in
  --torch-lib, default: the importable torch's lib/) is a C shim function, aoti_torch_* or
  torch_*; libtorch_python is not linked.
* CPython (NOTE: [limited API] in csrc/torch/module.cpp): the module is tagged abi3 (and its
  wheel cp3X-abi3), libpython is not linked, and every undefined Py*/_Py* symbol is in CPython's
  stable ABI, added in --python-min or before (the table of the abi3info package: the data
  abi3audit and torch-abi-audit use; `pip install abi3info`).
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import zipfile

SHIM = re.compile(r"^(aoti_torch_|torch_)")
UNSTABLE_NS = re.compile(r"\b(at|c10|torch)::")
PY_CAPI = re.compile(r"^_?Py")
# libtorch re-exports some C++ standard library instantiations; libstdc++ provides those.
STD = ("std::", "__gnu_cxx::", "typeinfo for std::", "vtable for std::", "VTT for std::")


def run(*cmd: str) -> str:
    return subprocess.run(cmd, check=True, capture_output=True, text=True).stdout


def undefined_symbols(so: str) -> list[str]:
    names = []
    for line in run("nm", "-D", "--undefined-only", so).splitlines():
        parts = line.split()
        if parts:
            names.append(parts[-1].split("@")[0])
    return names


def demangle(names: list[str]) -> list[str]:
    if not names:
        return []
    out = subprocess.run(["c++filt"], input="\n".join(names), check=True, capture_output=True, text=True).stdout
    return out.splitlines()


def needed(so: str) -> list[str]:
    return re.findall(r"\(NEEDED\)\s+Shared library: \[([^\]]+)\]", run("readelf", "-d", so))


def torch_exports(lib_dir: str) -> set[str]:
    names: set[str] = set()
    for f in sorted(os.listdir(lib_dir)):
        if f.startswith(("libtorch", "libc10")) and ".so" in f:
            for line in run("nm", "-D", "--defined-only", os.path.join(lib_dir, f)).splitlines():
                parts = line.split()
                if len(parts) >= 3:
                    names.add(parts[-1].split("@")[0])
    return names


def stable_python_abi() -> dict[str, tuple[int, int]]:
    """CPython's stable-ABI symbols -> the version each joined it in."""
    try:
        import abi3info
    except ImportError:
        sys.exit("abi_audit: needs the abi3info package (pip install abi3info): CPython's stable ABI, symbol "
                 "by symbol, with the version each joined it")
    table = {}
    for sym, item in list(abi3info.FUNCTIONS.items()) + list(abi3info.DATAS.items()):
        table[sym.name] = (item.added.major, item.added.minor)
    return table


def audit_module(so: str, shown: str, exports: set[str], py_table: dict, python_min: tuple[int, int]) -> list[str]:
    errors = []
    names = undefined_symbols(so)
    plain = demangle(names)
    shims = sorted(n for n in names if SHIM.match(n))
    for raw, nice in zip(names, plain):
        if raw.startswith("_Z") and UNSTABLE_NS.search(nice):
            errors.append(f"{shown}: undefined torch C++ symbol (not the stable ABI): {nice}")
        elif raw in exports and not SHIM.match(raw) and not nice.startswith(STD):
            errors.append(f"{shown}: undefined libtorch symbol outside the C shim: {nice}")
    py = sorted(n for n in names if PY_CAPI.match(n))
    for n in py:
        if n not in py_table:
            errors.append(f"{shown}: {n} is not in CPython's stable ABI")
        elif py_table[n] > python_min:
            errors.append(f"{shown}: {n} joined the stable ABI in {py_table[n][0]}.{py_table[n][1]}, after "
                          f"{python_min[0]}.{python_min[1]}")
    libs = needed(so)
    for lib in libs:
        if lib.startswith("libtorch_python") or re.match(r"libpython3\.\d+", lib):
            errors.append(f"{shown}: links {lib} (outside the stable ABIs)")
    if ".abi3." not in os.path.basename(so):
        errors.append(f"{shown}: the module's file name has no abi3 tag")
    print(f"[abi-audit] {shown}: {len(names)} undefined symbols: {len(shims)} torch C shim, {len(py)} CPython "
          f"({', '.join(py)}); NEEDED {', '.join(libs)}")
    return errors


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("paths", nargs="+", help=".whl or .so files")
    ap.add_argument("--torch-lib", help="torch's lib/ directory (default: the importable torch's)")
    ap.add_argument("--python-min", default="3.10", help="the oldest CPython the modules are for (default 3.10)")
    args = ap.parse_args()
    python_min = tuple(int(x) for x in args.python_min.split("."))
    lib_dir = args.torch_lib
    if lib_dir is None:
        import torch

        lib_dir = os.path.join(os.path.dirname(torch.__file__), "lib")
    exports = torch_exports(lib_dir)
    py_table = stable_python_abi()
    print(f"[abi-audit] {len(exports)} symbols exported by torch's libraries in {lib_dir}; CPython's stable ABI "
          f"from abi3info ({len(py_table)} symbols); oldest CPython {args.python_min}")
    errors: list[str] = []
    with tempfile.TemporaryDirectory() as tmp:
        for path in args.paths:
            if path.endswith(".whl"):
                tag = os.path.basename(path)[:-4].split("-")
                if len(tag) < 5 or tag[-2] != "abi3" or tag[-3] != f"cp{python_min[0]}{python_min[1]}":
                    errors.append(f"{path}: the wheel is not tagged cp{python_min[0]}{python_min[1]}-abi3")
                out = os.path.join(tmp, os.path.basename(path))
                with zipfile.ZipFile(path) as z:
                    sos = [n for n in z.namelist() if n.endswith(".so")]
                    z.extractall(out, members=sos)
                if not sos:
                    errors.append(f"{path}: holds no compiled module")
                for n in sos:
                    errors += audit_module(os.path.join(out, n), f"{os.path.relpath(path)}:{n}", exports, py_table,
                                           python_min)
            else:
                errors += audit_module(path, path, exports, py_table, python_min)
    for e in errors:
        print(f"[abi-audit] VIOLATION {e}", file=sys.stderr)
    print(f"[abi-audit] {'FAILED' if errors else 'OK'}: {len(errors)} violation(s) in {len(args.paths)} file(s)")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
