#!/usr/bin/env python3
"""Write stand-in shared libraries for the CUDA libraries a PyPI torch wheel links against.

PyPI carries no CPU-only torch for Linux x86_64: the wheel's libtorch_cuda.so names cuDNN,
cuBLAS, cuFFT, cuSPARSE, NCCL, ... (about 2.5 GB of wheels) as load-time dependencies, although
a CPU run never calls them. This script lists every dynamic symbol that the torch libraries
import from a library that is not installed, and builds a small stub library per missing soname
that exports those symbols (with the soname's symbol version where the reference carries one).
Each stub function returns 1, a "not initialised" status for the CUDA libraries; on a machine
without a GPU nothing calls them, because the CUDA runtime (the real libcudart, installed from
`nvidia-cuda-runtime`) reports no device.

    python3 cuda_stubs.py TORCH_PACKAGE_DIR OUT_DIR

Stubs go to OUT_DIR (put it in torch/lib: the torch libraries carry $ORIGIN in their RPATH).
"""

import os
import re
import subprocess
import sys
import tempfile

# The driver is not stubbed: a stand-in would make the CUDA runtime see a driver. Only
# libcaffe2_nvrtc.so needs it, and torch loads that library on demand, never at import.
NEVER_STUB = {"libcuda.so.1"}
SYSTEM_DIRS = ["/lib/x86_64-linux-gnu", "/usr/lib/x86_64-linux-gnu", "/lib64", "/usr/lib64", "/lib", "/usr/lib"]


def elf_files(root):
    for dirpath, _, names in os.walk(root):
        for n in names:
            p = os.path.join(dirpath, n)
            if (".so" in n) and os.path.isfile(p) and not os.path.islink(p):
                with open(p, "rb") as f:
                    if f.read(4) == b"\x7fELF":
                        yield p


def needed_and_rpath(path):
    out = subprocess.run(["readelf", "-d", "-W", path], capture_output=True, text=True, check=True).stdout
    needed = re.findall(r"\(NEEDED\)\s+Shared library: \[([^\]]+)\]", out)
    rpath = []
    for m in re.findall(r"\((?:RPATH|RUNPATH)\)\s+Library r(?:un)?path: \[([^\]]+)\]", out):
        for d in m.split(":"):
            rpath.append(d.replace("$ORIGIN", os.path.dirname(path)))
    return needed, rpath


def dyn_syms(path):
    """(undefined, defined): undefined as (name, version or None, type, bind); defined names."""
    out = subprocess.run(["readelf", "-W", "--dyn-syms", path], capture_output=True, text=True, check=True).stdout
    undef, defined = [], set()
    for line in out.splitlines():
        parts = line.split()
        if len(parts) < 8 or not parts[0].endswith(":"):
            continue
        typ, bind, ndx, name = parts[3], parts[4], parts[6], parts[7]
        if not name:
            continue
        base, _, ver = name.partition("@")
        ver = ver.lstrip("@") or None
        if ndx == "UND":
            undef.append((base, ver, typ, bind))
        else:
            defined.add(base)
    return undef, defined


def version_needs(path):
    """Symbol version name -> soname that defines it, from the file's version-needs section."""
    out = subprocess.run(["readelf", "-V", "-W", path], capture_output=True, text=True, check=True).stdout
    needs, current = {}, None
    for line in out.splitlines():
        m = re.search(r"File: (\S+)", line)
        if m:
            current = m.group(1)
            continue
        m = re.search(r"Name: (\S+)", line)
        if m and current:
            needs[m.group(1)] = current
    return needs


def find_lib(name, dirs):
    for d in dirs:
        p = os.path.join(d, name)
        if os.path.exists(p):
            return os.path.realpath(p)
    return None


def main():
    if len(sys.argv) != 3:
        sys.exit("usage: cuda_stubs.py TORCH_PACKAGE_DIR OUT_DIR")
    torch_dir, out_dir = sys.argv[1], sys.argv[2]
    os.makedirs(out_dir, exist_ok=True)
    files = list(elf_files(torch_dir))
    missing = {}  # soname -> list of referencing files
    present = set()
    for f in files:
        needed, rpath = needed_and_rpath(f)
        for n in needed:
            p = find_lib(n, rpath + [os.path.dirname(f)] + os.environ.get("LD_LIBRARY_PATH", "").split(":") + SYSTEM_DIRS)
            if p:
                present.add(p)
            elif n not in NEVER_STUB:
                missing.setdefault(n, []).append(f)
    if not missing:
        print("cuda_stubs: every library torch links against is installed; no stubs needed")
        return
    # Everything that can define a symbol: torch's own libraries, the present dependencies
    # (and theirs, one level is enough for libc/libstdc++/cudart), and the Python executable.
    definers = set(files) | present
    for p in list(present):
        needed, rpath = needed_and_rpath(p)
        for n in needed:
            q = find_lib(n, rpath + [os.path.dirname(p)] + SYSTEM_DIRS)
            if q:
                definers.add(q)
    definers.add(os.path.realpath(sys.executable))
    defined = set()
    for d in definers:
        defined |= dyn_syms(d)[1]
    versioned = {n: {} for n in missing}
    version_of = {n: set() for n in missing}
    unversioned = {}
    for f in files:
        needs = version_needs(f)
        for name, ver, typ, bind in dyn_syms(f)[0]:
            if bind == "WEAK":
                continue
            soname = needs.get(ver) if ver else None
            if soname in versioned:
                versioned[soname][name] = typ
                version_of[soname].add(ver)
            elif ver is None and name not in defined:
                unversioned[name] = typ
    for soname in sorted(missing):
        syms = dict(versioned[soname])
        # Unversioned references cannot be traced to one library; every unversioned stub
        # exports all of them (the first one loaded wins, and none is called).
        if not syms:
            syms = dict(unversioned)
        with tempfile.TemporaryDirectory() as tmp:
            src = os.path.join(tmp, "stub.c")
            with open(src, "w") as c:
                for i, (name, typ) in enumerate(sorted(syms.items())):
                    if typ == "OBJECT":
                        c.write(f'char stub_obj_{i}[256] __asm__("{name}");\n')
                    else:
                        c.write(f'int stub_fn_{i}(void) __asm__("{name}");\nint stub_fn_{i}(void) {{ return 1; }}\n')
            cmd = ["cc", "-shared", "-fPIC", "-O0", "-o", os.path.join(out_dir, soname), src, f"-Wl,-soname,{soname}"]
            if versioned[soname]:
                if len(version_of[soname]) != 1:
                    sys.exit(f"cuda_stubs: {soname}: expected one symbol version, found {sorted(version_of[soname])}")
                (ver,) = version_of[soname]
                vs = os.path.join(tmp, "stub.map")
                with open(vs, "w") as m:
                    m.write(f"{ver} {{\n  global:\n")
                    for name in sorted(syms):
                        m.write(f'    "{name}";\n')
                    m.write("  local: *;\n};\n")
                cmd.append(f"-Wl,--version-script={vs}")
            subprocess.run(cmd, check=True)
        print(f"cuda_stubs: {soname}: {len(syms)} symbols (needed by {len(missing[soname])} torch libraries)")


if __name__ == "__main__":
    main()
