# SPDX-License-Identifier: Apache-2.0
"""Static SASS of a kernel's steady-state loop, per tensor-core instruction (no GPU needed).

    python benchmarks/sass_loops.py OBJ_OR_CUBIN FUNCTION_REGEX [--arch sm_90a] [--span START:END]

Finds the functions matching FUNCTION_REGEX (mangled names) in a CUDA object, shared library or
cubin, and for the first one prints the loop formed by each backward branch whose body holds
tensor-core instructions (HMMA): its instruction count, HMMA count, instructions per HMMA and an
opcode histogram. ``--span`` counts an explicit address range instead (hex, end excluded), for a
loop whose backward branch also spans code that runs once per output tile, as Marlin's does.

One HMMA.16816 with fp16 operands multiplies a 16 x 16 tile by a 16 x 8 one, so at 16 tokens the
GQSA tensor-core kernel and Marlin both issue one HMMA per 128 weight slots and 8 tokens: the
instructions per HMMA compare their loops' work directly. cuobjdump and nvdisasm must be on PATH
(CUDA toolkit, or the pip wheels nvidia-cuda-cuobjdump and nvidia-cuda-nvdisasm); ``CUOBJDUMP``
overrides the first."""

from __future__ import annotations

import argparse
import collections
import os
import re
import subprocess

CUOBJDUMP = os.environ.get("CUOBJDUMP", "cuobjdump")


def functions(obj: str, arch: str, pattern: str) -> list:
    """Mangled names matching ``pattern`` that have code for ``arch``, with registers and stack."""
    usage = subprocess.run([CUOBJDUMP, "-res-usage", obj], capture_output=True, text=True, check=True).stdout
    found, cur, name = [], None, None
    for line in usage.splitlines():
        if m := re.search(r"arch = (sm_\w+)", line):
            cur = m.group(1)
        if m := re.search(r"Function (\S+):", line):
            name = m.group(1)
        elif name and (m := re.search(r"REG:(\d+) STACK:(\d+)", line)):
            if cur in (None, arch) and re.search(pattern, name):
                found.append((name, int(m.group(1)), int(m.group(2))))
            name = None
    return found


def instructions(obj: str, arch: str, name: str) -> list:
    """(address, opcode with its operands, predicate removed) of one function's SASS."""
    sass = subprocess.run([CUOBJDUMP, "-sass", "-arch", arch, "-fun", name, obj],
                          capture_output=True, text=True, check=True).stdout
    return [(int(a, 16), re.sub(r"^@!?U?P\w+\s+", "", op.strip()))
            for a, op in re.findall(r"/\*([0-9a-f]{4,})\*/\s+(.*?);", sass)]


def describe(ops: list) -> str:
    hist = collections.Counter(op.split()[0] for op in ops)
    hmma = sum(v for k, v in hist.items() if k.startswith("HMMA"))
    per = f"{len(ops) / hmma:.1f} per HMMA" if hmma else "no HMMA"
    return (f"{len(ops)} instructions, {hmma} HMMA, {per}\n    "
            + ", ".join(f"{k} {v}" for k, v in hist.most_common()))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("obj")
    p.add_argument("pattern")
    p.add_argument("--arch", default="sm_90a")
    p.add_argument("--span", help="START:END addresses in hex, END excluded")
    a = p.parse_args()
    try:
        found = functions(a.obj, a.arch, a.pattern)
    except FileNotFoundError:
        raise SystemExit(f"{CUOBJDUMP} not found: put cuobjdump on PATH or name it in CUOBJDUMP")
    except subprocess.CalledProcessError as e:
        raise SystemExit(f"cuobjdump could not read {a.obj}: {e.stderr.strip()}")
    if not found:
        raise SystemExit(f"no function matching {a.pattern!r} with {a.arch} code in {a.obj}")
    name, regs, stack = found[0]
    ins = instructions(a.obj, a.arch, name)
    print(f"{os.path.basename(a.obj)} {a.arch} {name}: {len(ins)} instructions, {regs} registers, "
          f"{stack} bytes of stack ({len(found)} functions matched, the first shown)")
    if a.span:
        lo, hi = (int(x, 16) for x in a.span.split(":"))
        print(f"  span {lo:#x}-{hi:#x}: " + describe([op for x, op in ins if lo <= x < hi]))
        return
    for end, start in sorted({(x, int(t, 16)) for x, op in ins
                              for t in re.findall(r"BRA (?:\S+ )?(0x[0-9a-f]+)", op) if int(t, 16) < x}):
        body = [op for x, op in ins if start <= x <= end]
        if any(op.startswith("HMMA") for op in body):
            print(f"  loop {start:#x}-{end:#x}: " + describe(body))


if __name__ == "__main__":
    main()
