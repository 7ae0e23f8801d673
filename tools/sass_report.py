"""Static instruction budget of memcore's CUDA kernels, read from their compiled code (no GPU needed).

Builds csrc/cuda/*.cu for sm_90 and sm_80 with nvcc (the flags of setup.py's CUDA build, torch's
headers from the running interpreter: use a CUDA build of torch, e.g. .venv-cuda), disassembles the
cubins with nvdisasm, finds each kernel's hot loops and reports per kernel instance:

    regs, stack, spills  cuobjdump -res-usage and ptxas -v
    elem/iter            elements one thread handles per trip of the loop (stream loads x width)
    instr/elem           SASS instructions per element on the loop's hot path (see below)
    half/elem            of those, instructions of a 16-lane pipe (see PIPES)
    mufu/elem            transcendental / conversion unit (16 lanes per SM: 8 cycles a warp)
    cyc/elem             per-SMSP cycles per element (a warp's 32 lanes in parallel) = the
                         largest of: issue (1 instruction a cycle), ALU pipe (2 cycles per
                         instruction), FMA pipes, XU (8 cycles), FP64
    roofline             bytes per element (HBM) vs that issue rate, per device (DEVICES)

Hot path: a loop is a backward branch; its body is the instructions between the branch target and
the branch. The hot path is the shortest path through the body (forward branches inside it skip
blocks: the rare rescale of the running max, the pack that holds the target), counted with
predicated-off instructions, which still take an issue slot. A kernel whose loop the compiler
unrolled has several loops from one pass (unrolled body + remainder, a copy per call site): loops
are grouped by the kernel-level source line their loads inline from, and the one doing the most
elements per trip is reported. A kernel with several passes over the same elements (forward +
gradient) reports their sum. Kernels without an element loop (the split finish, the loss
reduction) report their whole instruction count per row.

    .venv-cuda/bin/python -m tools.sass_report              # table to stdout (.venv-cuda: tools/check_cuda_build.sh's)
    python -m tools.sass_report --arch 90 --json out.json --csv out.csv --markdown sass.md
    python -m tools.sass_report --before old.json --markdown sass.md   # an earlier run's figures beside each row
    python -m tools.sass_report --store                     # into benchmarks/results.csv, for RESULTS.md

The model is an estimate: boost clocks (DEVICES), no memory latency, no occupancy limit. It
answers "can this loop keep up with HBM at all", not "how fast will it run".
"""

import argparse
import csv
import glob
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # run as a script: the repository root holds benchmarks/
    sys.path.insert(0, ROOT)
from benchmarks import store  # noqa: E402
from benchmarks.goals import Goal, select  # noqa: E402

# Devices of the roofline: SMs, boost clock (GHz), HBM bandwidth (TB/s), SASS arch. A dispatcher
# per SM sub-partition (4 per SM) issues one warp instruction per cycle on sm_80 and sm_90.
DEVICES = {
    "H100 SXM": dict(sms=132, ghz=1.98, tbs=3.35, arch="90"),
    "H200": dict(sms=132, ghz=1.98, tbs=4.8, arch="90"),
    "A100 SXM 80GB": dict(sms=108, ghz=1.41, tbs=2.039, arch="80"),
}
ISSUE_PER_SM_PER_CLK = 4  # warp instructions

# Pipes by opcode (the part before the first '.'), after the CUDA programming guide's throughput
# table for compute capability 8.0 / 9.0 and Nsight Compute's pipe names. "Half-rate": the 16-lane
# pipes, ALU (integer, logic, compare, select, min/max, moves, bf16 packs) and the heavy FMA pipe's
# integer multiply-adds (IMAD, also used by the compiler for moves and shifts): a warp instruction
# holds them two cycles, against one for FP32 FFMA/FADD/FMUL on sm_90 (two on sm_80's 16-lane
# FP32 pipe, counted in the cycle model, not in "half-rate").
PIPES = {
    "fma": "FFMA FADD FMUL FFMA32I FADD32I FMUL32I HFMA2 HADD2 HMUL2 FSWZADD",
    "imad": "IMAD IMUL IDP IMADSP",
    "alu": "FSETP FSEL FMNMX FSET ISETP IADD3 IADD LOP3 LOP SEL SHF SHL SHR LEA PRMT MOV MOV32I IMNMX "
    "VIMNMX VIMNMX3 IABS PLOP3 P2R R2P F2FP HMNMX2 HSETP2 HSET2 I2FP F2IP BMSK SGXT VABSDIFF FCHK "
    "CS2R LEPC",
    "xu": "MUFU F2F F2I I2F FRND POPC FLO BREV",
    "fp64": "DADD DMUL DFMA DSETP DMNMX",
    "mem": "LDG STG LD ST LDS STS LDL STL ATOM ATOMG ATOMS RED REDG SHFL LDC S2R BAR MEMBAR MATCH "
    "VOTE ERRBAR CCTL LDSM",
}
PIPE_OF = {op: pipe for pipe, ops in PIPES.items() for op in ops.split()}


def pipe_of(opcode: str) -> str:
    root = opcode.split(".")[0]
    if root.startswith("U") and root not in PIPE_OF:  # uniform datapath: an issue slot, no lanes
        return "other"
    if root == "F2F" and ".F64" in opcode:
        return "fp64"
    return PIPE_OF.get(root, "other")


# ---------------------------------------------------------------- build


def tool(name: str) -> str:
    """nvcc/cuobjdump/nvdisasm: PATH, then the toolkit torch finds (CUDA_HOME, else its default), then
    triton's copies."""
    found = shutil.which(name)
    if found:
        return found
    dirs = []
    try:
        from torch.utils.cpp_extension import CUDA_HOME

        dirs.append(os.path.join(CUDA_HOME or "", "bin"))
        import triton  # noqa: F401  (pip's torch ships triton with cuobjdump/nvdisasm)

        dirs.append(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin"))
    except ImportError:
        pass
    for d in dirs:
        p = os.path.join(d, name)
        if os.path.isfile(p) and os.access(p, os.X_OK):
            return p
    sys.exit(f"sass_report: {name} not found (PATH, the CUDA toolkit torch finds, triton's bundled tools)")


def nvcc_command(src: str, arch: str, out: str) -> List[str]:
    """nvcc for one device-only cubin, with setup.py's nvcc flags and torch's extension flags."""
    # torch.utils.cpp_extension looks for the toolkit when imported: point it at the nvcc in use
    os.environ.setdefault("CUDA_HOME", os.path.dirname(os.path.dirname(os.path.realpath(tool("nvcc")))))
    try:
        import torch
        from torch.utils.cpp_extension import COMMON_NVCC_FLAGS, include_paths
    except ImportError:
        sys.exit("sass_report: needs torch (a CUDA build for its CUDA headers, e.g. .venv-cuda)")
    if not torch.version.cuda:
        sys.exit(
            f"sass_report: torch {torch.__version__} is a CPU build without CUDA headers; run it with a CUDA "
            "build of torch (e.g. .venv-cuda/bin/python, made by tools/check_cuda_build.sh)"
        )
    incs = (
        include_paths("cuda") if "device_type" in include_paths.__code__.co_varnames else include_paths(True)
    )
    incs = list(incs)
    for p in sys.path:  # pip's CUDA torch: the toolkit headers ship in nvidia/*/include (as setup.py)
        for sub in ("nvidia/cu13/include", "nvidia/cuda_runtime/include"):
            d = os.path.join(p, sub)
            if p and os.path.isdir(d):
                incs.append(d)
    incs.append(sysconfig.get_paths()["include"])
    if not any(os.path.isfile(os.path.join(d, "c10", "cuda", "CUDAGuard.h")) for d in incs):
        sys.exit(
            f"sass_report: torch {torch.__version__} has no CUDA headers; run it with a CUDA build "
            "of torch (e.g. .venv-cuda/bin/python, made by tools/check_cuda_build.sh)"
        )
    std = "-std=c++20" if tuple(int(x) for x in torch.__version__.split(".")[:2]) >= (2, 10) else "-std=c++17"
    cmd = [
        tool("nvcc"),
        "-cubin",
        f"-arch=sm_{arch}",
        "-O3",
        "--expt-relaxed-constexpr",
        "-lineinfo",
        std,
        "-DTORCH_EXTENSION_NAME=_C",
        "-DTORCH_API_INCLUDE_EXTENSION_H",
        "-DMEMCORE_WITH_CUDA",
        "-D_GLIBCXX_USE_CXX11_ABI=1",
        "-diag-suppress=3189",
        "-Xptxas",
        "-v",
        "-o",
        out,
        src,
    ]
    cmd[1:1] = list(dict.fromkeys(COMMON_NVCC_FLAGS))
    for d in dict.fromkeys(incs):
        cmd.insert(-1, f"-I{d}")
    return cmd


def build(src: str, arch: str, work: str) -> Tuple[str, str]:
    """Compiles src for sm_<arch>; returns (cubin path, ptxas -v log)."""
    out = os.path.join(work, f"{os.path.splitext(os.path.basename(src))[0]}.sm_{arch}.cubin")
    env = dict(os.environ)
    env.setdefault("CUDA_HOME", os.path.dirname(os.path.dirname(tool("nvcc"))))
    r = subprocess.run(nvcc_command(src, arch, out), capture_output=True, text=True, env=env)
    if r.returncode != 0:
        sys.exit(f"sass_report: nvcc failed on {src} for sm_{arch}:\n{r.stderr[-4000:]}")
    return out, r.stderr


# ---------------------------------------------------------------- parse


@dataclass
class Instr:
    addr: int
    pred: str
    opcode: str
    operands: str
    loc: Tuple[str, ...]  # the //## File lines (innermost first) of the instruction
    target: Optional[int] = None  # branch target address

    @property
    def root(self) -> str:
        return self.opcode.split(".")[0]


def disassemble(cubin: str) -> Dict[str, List[Instr]]:
    """Mangled kernel name -> its instructions in address order (nvdisasm -c -gi)."""
    text = subprocess.run(
        [tool("nvdisasm"), "-c", "-gi", cubin], capture_output=True, text=True, check=True
    ).stdout
    funcs: Dict[str, List[Instr]] = {}
    cur: Optional[List[Instr]] = None
    loc: List[str] = []
    pending = False
    all_labels: Dict[str, Dict[str, int]] = {}
    labels: Dict[str, int] = {}
    waiting: List[str] = []  # labels before the next instruction
    ins_re = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)\s*(.*?)\s*;")
    for line in text.splitlines():
        if line.startswith("\t.section\t.text."):
            name = line.split()[1].split(",")[0][len(".text.") :]
            cur = funcs.setdefault(name, [])
            labels = all_labels.setdefault(name, {})
            loc, pending, waiting = [], False, []
            continue
        if cur is None:
            continue
        s = line.strip()
        if re.match(r"^\.L_x_\d+:$", s):
            waiting.append(s[:-1])
            continue
        if s.startswith("//## File"):
            if not pending:
                loc, pending = [], True
            m = re.match(r'//## File "([^"]+)", line (\d+)', s)
            if m:
                loc.append(f"{os.path.basename(m.group(1))}:{m.group(2)}")
            continue
        m = ins_re.search(line)
        if m:
            pending = False
            ins = Instr(int(m.group(1), 16), (m.group(2) or "").strip(), m.group(3), m.group(4), tuple(loc))
            for lab in waiting:
                labels[lab] = ins.addr
            waiting = []
            t = re.search(r"\(\.L_x_\d+\)", ins.operands)
            if t:
                ins.operands = ins.operands.replace(t.group(0), "@" + t.group(0)[1:-1])
            cur.append(ins)
        if cur is not None and waiting and s.startswith("//-----"):
            waiting = []
    for name, code in funcs.items():
        for ins in code:
            m = re.search(r"@(\.L_x_\d+)", ins.operands)
            if m:
                ins.target = all_labels[name].get(m.group(1))
    return funcs


def per_function(text: str, head: str, parse: Callable[[str], object]) -> Dict[str, object]:
    """Mangled name (group 1 of ``head``) -> parse(line) of the first line after it that parses (not None)."""
    out, name = {}, None
    for line in text.splitlines():
        m = re.search(head, line)
        if m:
            name = m.group(1)
        elif name and parse(line) is not None:
            out[name], name = parse(line), None
    return out


def resources(cubin: str) -> Dict[str, Dict[str, int]]:
    """Mangled name -> REG / STACK / SHARED / LOCAL from cuobjdump -res-usage."""
    text = subprocess.run(
        [tool("cuobjdump"), "-res-usage", cubin], capture_output=True, text=True, check=True
    ).stdout
    found = re.compile(r"(REG|STACK|SHARED|LOCAL):(\d+)").findall
    return per_function(
        text, r"^\s*Function (\S+):", lambda ln: {k.lower(): int(v) for k, v in found(ln)} or None
    )


def spills(ptxas_log: str) -> Dict[str, Tuple[int, int]]:
    """Mangled name -> (spill store bytes, spill load bytes) from ptxas -v."""
    pattern = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")
    return per_function(
        ptxas_log,
        r"Function properties for (\S+)",
        lambda ln: tuple(map(int, pattern.search(ln).groups())) if pattern.search(ln) else None,
    )


def demangle(names: Sequence[str]) -> Dict[str, str]:
    filt = shutil.which("c++filt") or shutil.which("cu++filt")
    if not filt:
        return {n: n for n in names}
    r = subprocess.run([filt], input="\n".join(names), capture_output=True, text=True, check=True)
    return dict(zip(names, r.stdout.splitlines()))


# ---------------------------------------------------------------- loops


def mem_width(ins: Instr) -> int:
    """Bytes moved per thread by a global load/store (0 for anything else)."""
    if ins.root not in ("LDG", "STG", "LD", "ST"):
        return 0
    parts = ins.opcode.split(".")
    for p, w in (("128", 16), ("64", 8), ("U16", 2), ("S16", 2), ("U8", 1), ("S8", 1)):
        if p in parts:
            return w
    return 4


def branch_target(ins: Instr) -> Optional[int]:
    if ins.root not in ("BRA", "BRX", "JMP"):
        return None
    return ins.target


@dataclass
class Loop:
    head: int  # index of the first instruction
    tail: int  # index of the back-edge branch
    body: int = 0  # instructions in [head, tail]
    hot: int = 0  # instructions on the shortest path head -> tail
    hot_pipes: Dict[str, int] = field(default_factory=dict)
    stream_ops: int = 0
    stream_bytes: int = 0  # bytes of the stream's loads (or stores) per trip
    width: int = 0
    source: Tuple[str, ...] = ()
    inflight: int = 0  # stream loads issued before the first use of one of them (loads in flight)


def _regs(text: str) -> List[int]:
    """General registers named in an operand list (R4; R2.64 names the pair R2, R3)."""
    out = []
    for m in re.finditer(r"\bR(\d+)(\.64)?\b", text):
        r = int(m.group(1))
        out += [r, r + 1] if m.group(2) else [r]
    return out


def defs_uses(ins: Instr) -> Tuple[List[int], List[int]]:
    """(registers written, registers read) of an instruction: the first operand is the destination,
    except for stores and the like, which only read."""
    ops = ins.operands.split(",")
    if ins.root in ("STG", "ST", "STS", "STL", "RED", "REDG", "BRA", "EXIT", "BAR", "RET") or not ops:
        return [], _regs(ins.operands)
    first = _regs(ops[0])
    n = max(1, mem_width(ins) // 4) if ins.root in ("LDG", "LD") else 1
    return ([first[0] + k for k in range(n)] if first else []), _regs(",".join(ops[1:]))


def loads_in_flight(code: List[Instr], path: Sequence[int], width: int, which: str = "LD") -> int:
    """Stream loads (``width`` bytes) on a loop's hot path issued before any instruction reads a
    register one of them writes: the loads a thread has in flight at once in each trip."""
    pending, n = set(), 0
    for i in path:
        ins = code[i]
        written, read = defs_uses(ins)
        if pending.intersection(read):
            break
        if mem_width(ins) == width and ins.root.startswith(which):
            n += 1
            pending.update(written)
    return n


def waits_for_first_load(code: List[Instr], width: int) -> Tuple[int, str]:
    """(1, the instruction) when an instruction between the kernel's first global load (targets[row];
    scale[row] in input sqnorm) and its first stream load (``width`` bytes) reads what the first load
    wrote: in-order issue then holds the stream behind the first load's whole latency; (0, "") when
    none does; (-1, "") without such loads."""
    loads = [i for i, ins in enumerate(code) if ins.root in ("LDG", "LD") and mem_width(ins)]
    if not loads:
        return -1, ""
    first = loads[0]
    stream = next((i for i in loads[1:] if mem_width(code[i]) == width), None)
    if stream is None:
        return -1, ""
    written = set(defs_uses(code[first])[0])
    for i in range(first + 1, stream):
        if written.intersection(defs_uses(code[i])[1]):
            return 1, f"{code[i].opcode} at {code[i].addr:#x}"
    return 0, ""


def find_loops(code: List[Instr], labels_by_addr: Dict[int, int]) -> List[Loop]:
    loops = []
    for i, ins in enumerate(code):
        t = branch_target(ins)
        if t is not None and t <= ins.addr and t in labels_by_addr:
            loops.append(Loop(labels_by_addr[t], i))
    return loops


def hot_path(code: List[Instr], lp: Loop, labels_by_addr: Dict[int, int]) -> List[int]:
    """Indices on the shortest path from the loop head to its back-edge (forward branches only)."""
    INF = float("inf")
    n = lp.tail - lp.head + 1
    dist = [INF] * n
    prev = [-1] * n
    dist[0] = 1
    for k in range(n):
        if dist[k] == INF:
            continue
        i = lp.head + k
        if i == lp.tail:
            break
        ins = code[i]
        succ = []
        t = branch_target(ins)
        if t is not None and t > ins.addr and t in labels_by_addr and labels_by_addr[t] <= lp.tail:
            succ.append(labels_by_addr[t] - lp.head)
        unconditional_exit = (
            ins.root in ("EXIT", "RET") or (t is not None and ins.root == "BRA")
        ) and not ins.pred
        if not unconditional_exit:
            succ.append(k + 1)
        for s in succ:
            if dist[k] + 1 < dist[s]:
                dist[s], prev[s] = dist[k] + 1, k
    if dist[n - 1] == INF:
        return list(range(lp.head, lp.tail + 1))
    path, k = [], n - 1
    while k != -1:
        path.append(lp.head + k)
        k = prev[k]
    return path[::-1]


def count_pipes(code: List[Instr], idx: Sequence[int]) -> Dict[str, int]:
    out: Dict[str, int] = {}
    for i in idx:
        p = pipe_of(code[i].opcode)
        out[p] = out.get(p, 0) + 1
    return out


# ---------------------------------------------------------------- kernels

# family regex on the demangled name -> label, HBM bytes per element (in units of the element
# size), which memory ops carry the stream ("ld"/"st"), streams per element (loads per element
# per operand), and whether the kernel is per row (no element loop). The split launch of few wide
# rows: "forward (split)" (a slice per block; its merge is "split finish", per row) and "gradient
# (split)" (ce_backward's, and ce_forward_grad_'s second kernel).
FAMILIES = [
    (r"ce_forward_kernel<.*, (true|1)>|ce_forward_grad_kernel", "forward+grad (overwrite)", 2, "ld", 1),
    (r"ce_forward_kernel", "forward", 1, "ld", 1),
    (r"ce_backward_kernel", "backward", 2, "ld", 1),
    (r"ce_forward_options_kernel<.*, (true|1)>", "forward (options, softcap)", 1, "ld", 1),
    (r"ce_forward_options_kernel", "forward (options)", 1, "ld", 1),
    (r"ce_backward_options_kernel<.*, (true|1)>", "backward (options, softcap)", 2, "ld", 1),
    (r"ce_backward_options_kernel", "backward (options)", 2, "ld", 1),
    (r"scale_unless_one_kernel", "scale_unless_one", 2, "ld", 1),
    (r"ce_split_forward_kernel", "forward (split)", 1, "ld", 1),
    (r"ce_split_grad_kernel", "gradient (split)", 2, "ld", 1),
    (r"ce_split_finish_kernel", "split finish", 0, "", 0),
    (r"ce_reduce_kernel", "loss reduce", 0, "", 0),
    (r"ce_input_sqnorm_kernel", "input sqnorm", 1, "ld", 1),
    (r"probe_reduce_kernel", "curvature probe_reduce", 2, "ld", 2),
    (r"perturb_kernel", "curvature perturb", 2, "st", 1),
    (r".*", "other", 0, "", 0),
]
DTYPES = {"c10::BFloat16": ("bf16", 2), "c10::Half": ("fp16", 2), "float": ("fp32", 4), "double": ("fp64", 8)}


@dataclass
class Row:
    arch: str
    source: str
    kernel: str  # demangled, without namespaces and parameters
    family: str
    dtype: str
    regs: int
    stack: int
    local: int
    spill_stores: int
    spill_loads: int
    loops: int  # source loops summed
    elem_per_iter: float
    instr_per_elem: float
    half_per_elem: float
    mufu_per_elem: float
    cycles_per_elem: float
    bytes_per_elem: float
    per_row_instr: int  # whole-kernel instructions (kernels without an element loop)
    detail: List[Dict] = field(default_factory=list)
    shared: int = 0  # static shared memory per block (bytes)
    inflight: int = 0  # loads in flight per thread in the main loop (the fewest over its copies)
    inflight_max: int = 0  # the most over its copies
    load_width: int = 0  # bytes per thread of each of those loads
    waits_first_load: int = -1  # 1: the stream's first load waits for the kernel's first load
    first_load_use: str = ""  # the instruction that makes it wait
    nonloop_instr: int = 0  # instructions outside every loop (static: error paths included)
    nonloop_shfl: int = 0
    nonloop_mufu: int = 0


def short_name(demangled: str) -> str:
    s = re.sub(r"\(anonymous namespace\)::|memcore::|cuda::", "", demangled)
    s = s[len("void ") :] if s.startswith("void ") else s
    depth, out = 0, []
    for ch in s:  # drop the parameter list: the first '(' at template depth 0
        if ch == "(" and depth == 0:
            break
        depth += ch == "<"
        depth -= ch == ">"
        out.append(ch)
    return "".join(out)


def cycles(pipes: Dict[str, float], arch: str) -> float:
    """Per-SMSP cycles for the given per-lane instruction counts (see the module docstring)."""
    n = sum(pipes.values())
    alu, fma, imad, xu, fp64 = (pipes.get(k, 0) for k in ("alu", "fma", "imad", "xu", "fp64"))
    if arch == "80":  # 16-lane FP32 pipe shared with IMAD; FP64 8 lanes
        fma_cyc, fp64_cyc = 2 * (fma + imad), 4 * fp64
    else:  # heavy + lite FMA pipes: 32 FP32 lanes, IMAD on the heavy one only
        fma_cyc, fp64_cyc = max(fma + imad, 2 * imad), 2 * fp64
    return max(n, 2 * alu, fma_cyc, 8 * xu, fp64_cyc)


def analyse(arch: str, source: str, cubin: str, log: str) -> List[Row]:
    funcs = disassemble(cubin)
    res = resources(cubin)
    sp = spills(log)
    names = demangle(list(funcs))
    rows = []
    for mangled, code in funcs.items():
        if not code:
            continue
        dem = names.get(mangled, mangled)
        kname = short_name(dem)
        fam = next(f for f in FAMILIES if re.search(f[0], kname))
        _, label, bytes_units, which, streams = fam
        targs = re.search(r"<([^<>]*)>", kname)
        dtype_c = targs.group(1).split(",")[0].strip() if targs else ""
        dtype, esize = DTYPES.get(dtype_c, (dtype_c or "-", 0))
        if not esize:
            esize = 4
        labels = {ins.addr: i for i, ins in enumerate(code)}
        loops = find_loops(code, labels)
        for lp in loops:
            ops = [
                code[i]
                for i in range(lp.head, lp.tail + 1)
                if mem_width(code[i]) and code[i].root.startswith("LD" if which == "ld" else "ST")
            ]
            lp.width = max((mem_width(o) for o in ops), default=0)
            wide = [o for o in ops if mem_width(o) == lp.width]
            lp.stream_ops = len(wide)
            lp.stream_bytes = sum(mem_width(o) for o in wide)
            # the pass: the kernel-level source line the loop's loads inline from (the outermost
            # location), shared by an unrolled loop, its remainder, and its copies per call site
            lp.source = wide[0].loc[-1:] if wide else ()
            path = hot_path(code, lp, labels)
            lp.inflight = loads_in_flight(code, path, lp.width, "LD" if which == "ld" else "ST")
            lp.body = lp.tail - lp.head + 1
            lp.hot = len(path)
            lp.hot_pipes = count_pipes(code, path)
        # families without an element stream (split finish, loss reduce) report per row, whatever loops
        # they have
        cand = [lp for lp in loops if lp.stream_ops and streams]
        # innermost: drop a loop that contains another candidate
        cand = [
            a for a in cand if not any(b is not a and a.head <= b.head and b.tail <= a.tail for b in cand)
        ]
        width = max((lp.width for lp in cand), default=0)
        cand = [lp for lp in cand if lp.width == width]
        best: Dict[Tuple[str, ...], Loop] = {}
        for lp in cand:  # one per pass: the unrolled body, not its remainder
            elems = lp.stream_bytes / esize / streams
            cur = best.get(lp.source)
            if cur is None or (elems, -lp.hot / elems) > (
                cur.stream_bytes / esize / streams,
                -cur.hot * esize * streams / cur.stream_bytes,
            ):
                best[lp.source] = lp
        r = res.get(mangled, {})
        ss, sl = sp.get(mangled, (0, 0))
        row = Row(
            arch,
            os.path.basename(source),
            kname,
            label,
            dtype,
            r.get("reg", 0),
            r.get("stack", 0),
            r.get("local", 0),
            ss,
            sl,
            len(best),
            0.0,
            0.0,
            0.0,
            0.0,
            0.0,
            bytes_units * esize,
            sum(1 for ins in code if ins.root != "NOP" and branch_target(ins) != ins.addr),
        )
        if best and which:
            per: Dict[str, float] = {}
            for lp in best.values():
                elems = lp.stream_bytes / esize / streams
                for k, v in lp.hot_pipes.items():
                    per[k] = per.get(k, 0.0) + v / elems
                row.detail.append(
                    dict(
                        source=" <- ".join(lp.source),
                        head=hex(code[lp.head].addr),
                        tail=hex(code[lp.tail].addr),
                        body=lp.body,
                        hot=lp.hot,
                        elems=elems,
                        pipes=lp.hot_pipes,
                        inflight=lp.inflight,
                        width=lp.width,
                    )
                )
            row.elem_per_iter = min(lp.stream_bytes / esize / streams for lp in best.values())
            row.instr_per_elem = sum(per.values())
            row.half_per_elem = per.get("alu", 0) + per.get("imad", 0)
            row.mufu_per_elem = per.get("xu", 0)
            row.cycles_per_elem = cycles(per, arch)
            # every copy of the main loop (call sites, alignments), not only the one counted above
            copies = [
                lp.inflight
                for lp in cand
                if lp.source in best and lp.stream_bytes == best[lp.source].stream_bytes  # not the remainders
            ]
            row.inflight, row.inflight_max = min(copies), max(copies)
            row.load_width = width
            row.waits_first_load, row.first_load_use = waits_for_first_load(code, width)
        in_loop = {i for lp in loops for i in range(lp.head, lp.tail + 1)}
        outside = [ins for i, ins in enumerate(code) if i not in in_loop and ins.root != "NOP"]
        row.nonloop_instr = len(outside)
        row.nonloop_shfl = sum(ins.root == "SHFL" for ins in outside)
        row.nonloop_mufu = sum(ins.root == "MUFU" for ins in outside)
        row.shared = r.get("shared", 0)
        rows.append(row)
    return rows


def roofline(row: Row) -> Dict[str, Dict[str, float]]:
    """Per device of row's arch: instruction slots per element at full HBM bandwidth, and the
    fraction of that bandwidth the loop can sustain by the cycle model (capped at 1)."""
    out = {}
    if not row.cycles_per_elem or not row.bytes_per_elem:
        return out
    for dev, d in DEVICES.items():
        if d["arch"] != row.arch:
            continue
        hbm_elems = d["tbs"] * 1e12 / row.bytes_per_elem
        lane_slots = d["sms"] * d["ghz"] * 1e9 * ISSUE_PER_SM_PER_CLK * 32
        out[dev] = dict(
            budget=lane_slots / hbm_elems, ceiling=min(1.0, lane_slots / row.cycles_per_elem / hbm_elems)
        )
    return out


# ---------------------------------------------------------------- bytes in flight (Little's law)

# A stream can run at bandwidth B only with B x L bytes in flight (Little's law), L the DRAM
# latency under that load. Bandwidths: NVIDIA's datasheets (DEVICES). L: an assumption, the same
# for the three devices: idle DRAM latency measured by public pointer-chase microbenchmarks on
# these GPUs is several hundred ns (Chips and Cheese, "Nvidia's H100: Funny L2, and Tons of
# Bandwidth", 2023, H100 PCIe and A100; Luo et al., arXiv:2402.13499, 2024, Hopper and Ampere), and
# queueing adds to it near full bandwidth. tools/gpu_bench.py measures the idle latency of the GPU
# in hand (its "latency" case); tolerated_ns, the largest latency a launch still hides, does not
# depend on the assumption.
LATENCY_NS = 600.0
# per SM: registers, resident threads, resident blocks, shared memory (CUDA programming guide,
# compute capabilities 8.0 and 9.0); registers are allocated per warp in units of 256
SM_LIMITS = {"90": (65536, 2048, 32, 228 * 1024), "80": (65536, 2048, 32, 164 * 1024)}
PACK = 16  # bytes of a vector load


@dataclass
class Launch:
    """A launch-shape class: the kernel instance it runs and the row it streams."""

    name: str
    family: str  # FAMILIES label of the kernel
    tpr: int  # threads per row (per slice on the split launch)
    threads: int  # threads per block
    cols: int  # C (D for input sqnorm)
    rows: int = 0  # rows of the launch (the split launch: for its slices)
    vec: bool = True  # the 16-byte-pack instance (False: the scalar one)
    traffic: float = 1.0  # bytes moved per byte loaded (the backward writes its gradient too)


# the classes of dispatch_shape and the split decision (csrc/cuda/cross_entropy.cu), at the C of
# the slow spots docs/kernels.md weighs; bf16 and fp32 each
LAUNCHES = [
    Launch("warp per row, C = 10", "forward", 32, 256, 10),
    Launch("warp per row, C = 1000", "forward", 32, 256, 1000),
    Launch("256 threads, C = 2049", "forward", 256, 256, 2049),
    Launch("256 threads, C = 4096", "forward", 256, 256, 4096),
    Launch("256 threads, C = 8192", "forward", 256, 256, 8192),
    Launch("256 threads, C = 16384", "forward", 256, 256, 16384),
    Launch("512 threads, C = 32000", "forward", 512, 512, 32000),
    Launch("512 threads, C = 128256", "forward", 512, 512, 128256),
    Launch("backward, 512 threads, C = 32000", "backward", 512, 512, 32000, traffic=2.0),
    Launch("split, 16 x 256000", "forward (split)", 256, 256, 256000, rows=16),
    Launch("input sqnorm, D = 4096", "input sqnorm", 256, 256, 4096),
    Launch("input sqnorm scalar, D = 4095", "input sqnorm", 256, 256, 4095, vec=False),
]
MODEL_DTYPES = ("bf16", "fp32")


def split_slices(n: int, c: int, esize: int, sms: int) -> int:
    """cerow::split_slices (csrc/cuda/cross_entropy_row.h): slices per row of the split launch."""
    if n <= 0 or n >= sms:
        return 1
    s = min((2 * sms + n - 1) // n, c * esize // 16384, 32)
    return 1 if s < 2 else s


def blocks_per_sm(regs: int, threads: int, shared: int, arch: str) -> int:
    """Resident blocks per SM: the fewest the registers, threads, block slots and shared memory allow."""
    reg_file, max_threads, max_blocks, smem = SM_LIMITS[arch]
    per_warp = -(-max(regs, 1) * 32 // 256) * 256
    warps = -(-threads // 32)
    by_regs = (4 * ((reg_file // 4) // per_warp)) // warps  # four sub-partitions, each a quarter
    by_smem = smem // (shared + 1024)  # 1 KiB reserved per block
    return max(0, min(by_regs, max_threads // threads, max_blocks, by_smem))


def _template_args(kernel: str) -> List[str]:
    m = re.search(r"<(.*)>", kernel)
    return [a.strip() for a in m.group(1).split(",")] if m else []


def _instance(rows: List[Row], arch: str, launch: Launch, dtype: str) -> Optional[Row]:
    """The kernel instance a launch class runs: its family and dtype, its threads per row (forward,
    backward, split), the 16-byte-pack instance (or the scalar one), without the overwrite pass."""
    found = []
    for r in rows:
        if r.arch != arch or r.family != launch.family or r.dtype != dtype:
            continue
        args = _template_args(r.kernel)
        if launch.family in ("forward", "backward"):
            if len(args) < 3 or int(args[1]) != launch.tpr:
                continue
            vec = int(args[2])
        elif launch.family == "forward (split)":
            if len(args) < 2 or int(args[1]) != launch.tpr:
                continue
            vec = 2
        else:  # input sqnorm: <T, VEC>
            vec = int(args[1]) if len(args) > 1 else 1
        if (vec > 1) == launch.vec:
            found.append((vec, r))
    return max(found, key=lambda x: x[0])[1] if found else None


def inflight(rows: List[Row], latency_ns: float = LATENCY_NS) -> List[Dict]:
    """Per launch class, dtype and device: blocks per SM, loads in flight per thread (off the SASS of
    the main loop), bytes in flight per SM, and the fraction of HBM bandwidth Little's law allows.

    A row (slice) of R bytes is streamed by tpr threads with u loads of w bytes each in flight; a
    trip moves at most tpr * u * w bytes, so R takes trips = ceil(R / (tpr u w)) round trips of L,
    one more where the stream waits for the kernel's first load (targets[row]: its latency is paid
    before the first pack is asked for). Per SM, blocks * rows-per-block rows are resident, so the
    bytes in flight are blocks * rows * min(R, tpr u w) and the rate is
    blocks * rows * R / ((trips + wait) * L), times the launch's traffic per byte loaded. The split
    launch runs all its blocks in one wave: its rate is that of its blocks over the SMs.
    """
    out = []
    for launch in LAUNCHES:
        for dtype in MODEL_DTYPES:
            esize = 2 if dtype == "bf16" else 4
            for dev, d in DEVICES.items():
                r = _instance(rows, d["arch"], launch, dtype)
                if r is None or not r.inflight:
                    continue
                blocks = blocks_per_sm(r.regs, launch.threads, r.shared, d["arch"])
                rows_per_block = launch.threads // launch.tpr
                row_bytes = launch.cols * esize
                slices = 1
                if launch.rows:
                    slices = split_slices(launch.rows, launch.cols, esize, d["sms"])
                    row_bytes = -(-row_bytes // slices)
                trip = launch.tpr * r.inflight * r.load_width
                trips = -(-row_bytes // trip)
                wait = max(0, r.waits_first_load)
                resident = blocks * rows_per_block
                if launch.rows:  # one wave: its blocks spread over the SMs
                    resident = min(resident, launch.rows * slices / d["sms"])
                in_flight = resident * min(row_bytes, trip)
                rate = resident * row_bytes / (trips + wait) * launch.traffic  # bytes per latency, per SM
                per_sm = d["tbs"] * 1e12 / d["sms"]  # bytes per second per SM at full bandwidth
                need = per_sm * latency_ns * 1e-9
                out.append(
                    {
                        "launch": launch.name,
                        "kernel": r.kernel,
                        "dtype": dtype,
                        "device": dev,
                        "arch": d["arch"],
                        "regs": r.regs,
                        "threads": launch.threads,
                        "blocks_per_sm": blocks,
                        "loads_per_thread": r.inflight,
                        "loads_per_thread_max": r.inflight_max,
                        "load_bytes": r.load_width,
                        "row_kib": round(row_bytes / 1024, 2),
                        "slices": slices,
                        "trips": trips,
                        "waits_first_load": r.waits_first_load,
                        "kib_in_flight": round(in_flight / 1024, 1),
                        "tolerated_ns": round(rate / per_sm * 1e9, 0),
                        "hbm_pct": round(100 * min(1.0, rate / need), 0),
                        "latency_ns": latency_ns,
                    }
                )
    return out


def _span(lo: int, hi: int) -> str:
    return f"{lo}" if lo == hi else f"{lo}-{hi}"


def inflight_markdown(model: List[Dict]) -> str:
    head = (
        "| launch | dtype | device | kernel | regs | blocks/SM | loads/thread x bytes | row KiB | trips "
        "| waits for targets[row] | KiB in flight/SM | tolerated latency (ns) | HBM % at "
        f"{LATENCY_NS:g} ns |\n" + "|---" * 13 + "|\n"
    )
    lines = [
        f"| {m['launch']} | {m['dtype']} | {m['device']} | {m['kernel']} | {m['regs']} | {m['blocks_per_sm']} | "
        f"{_span(m['loads_per_thread'], m['loads_per_thread_max'])} x {m['load_bytes']} | {m['row_kib']:g} | "
        f"{m['trips']} | "
        f"{'yes' if m['waits_first_load'] == 1 else 'no'} | {m['kib_in_flight']:g} | {m['tolerated_ns']:.0f} | "
        f"{m['hbm_pct']:.0f} |"
        for m in model
    ]
    return head + "\n".join(lines) + "\n"


# ---------------------------------------------------------------- report

HEADLINE = (
    "forward",
    "forward+grad (overwrite)",
    "backward",
    "forward (split)",
    "gradient (split)",
    "forward (options)",
    "backward (options)",
    "forward (options, softcap)",
    "backward (options, softcap)",
    "split finish",
    "input sqnorm",
    "curvature probe_reduce",
    "curvature perturb",
)


def headline(rows: List[Row]) -> List[Row]:
    """Per (arch, family, dtype): the instance of the widest loads and the most threads per row
    (the large-vocabulary launch: 16-byte packs, a block per row)."""

    def key(r: Row):
        width = max((d["elems"] for d in r.detail), default=0)
        nums = [int(x) for x in re.findall(r"\b(\d+)\b", r.kernel)]
        if r.family in MIN_CEILING:  # one pack per trip: the packed instance first (VEC), not the
            return (nums[1:2], width, nums)  # scalar one, whose zero-fill loop of skipped rows is wider
        return (width, nums)

    pick: Dict[Tuple[str, str, str], Row] = {}
    for r in rows:
        if r.family not in HEADLINE or r.dtype == "fp64":
            continue
        k = (r.arch, r.family, r.dtype)
        if k not in pick or key(r) > key(pick[k]):
            pick[k] = r
    order = {f: i for i, f in enumerate(HEADLINE)}
    dorder = {"bf16": 0, "fp16": 1, "fp32": 2}
    return sorted(pick.values(), key=lambda r: (-int(r.arch), order[r.family], dorder.get(r.dtype, 9)))


def markdown(rows: List[Row], before: Optional[List[Dict]] = None) -> str:
    """The headline table; with before (rows of an earlier --json), its instr/elem and ceiling
    beside each row (matched by arch, kernel family and dtype)."""
    devs = list(DEVICES)
    names = set(Row.__dataclass_fields__)
    old_rows = headline([Row(**{k: v for k, v in b.items() if k in names}) for b in (before or [])])
    old = {(b.arch, b.family, b.dtype): dict(asdict(b), roofline=roofline(b)) for b in old_rows}
    extra = " before: instr/elem, half-rate, ceiling |" if before else ""
    lines = [
        "| arch | kernel | instance | regs | spills (B) | elem/iter | instr/elem | half-rate/elem | mufu/elem "
        "| cyc/elem | bytes/elem | " + " | ".join(f"{d}: slots/elem, ceiling" for d in devs) + " |" + extra,
        "|" + "---|" * (11 + len(devs) + (1 if before else 0)),
    ]
    for r in headline(rows):
        rf = roofline(r)
        cells = []
        for d in devs:
            cells.append(f"{rf[d]['budget']:.1f}, {100 * rf[d]['ceiling']:.0f}%" if d in rf else "")
        if r.cycles_per_elem:
            figs = (
                f"{r.elem_per_iter:g} | {r.instr_per_elem:.1f} | {r.half_per_elem:.1f} | {r.mufu_per_elem:.2f} | "
                f"{r.cycles_per_elem:.1f} | {r.bytes_per_elem:g}"
            )
        else:
            figs = f"- | {r.per_row_instr} per row | | | | "
        inst = r.kernel.split("<", 1)[1].rstrip(">") if "<" in r.kernel else ""
        line = (
            f"| sm_{r.arch} | {r.family} | {inst} | {r.regs} | {r.spill_stores + r.spill_loads} | {figs} | "
            + " | ".join(cells)
            + " |"
        )
        if before:
            b = old.get((r.arch, r.family, r.dtype))
            if b and b["cycles_per_elem"]:
                ceil = ", ".join(f"{100 * v['ceiling']:.0f}%" for v in b.get("roofline", {}).values())
                line += f" {b['instr_per_elem']:.1f}, {b['half_per_elem']:.1f}, {ceil} |"
            elif b:
                line += f" {b['per_row_instr']} per row |"
            else:
                line += " |"
        lines.append(line)
    return "\n".join(lines) + "\n"


def preamble(before_label: Optional[str] = None) -> str:
    devs = "; ".join(
        f"{k}: {v['sms']} SMs x {v['ghz']} GHz, {v['tbs']} TB/s (sm_{v['arch']})" for k, v in DEVICES.items()
    )
    return (
        "Per kernel, the hot loop of the large-vocabulary launch (16-byte loads, a block per row), read from the "
        "SASS by `tools/sass_report.py`. instr/elem: instructions per element on the loop's hot path "
        "(forward+grad: both passes); half-rate: ALU + IMAD-pipe instructions (16 lanes a cycle); mufu: "
        "transcendental/conversion unit; cyc/elem: per-SMSP cycles per element by the pipe model; "
        "slots/elem: instruction issue slots per element at full HBM bandwidth (4 warp instructions per SM "
        "per cycle); ceiling: fraction of HBM bandwidth the loop can sustain by that model (bytes/elem: "
        f"HBM traffic per element, forward+grad counting one read and one write). Devices: {devs}. "
        "Boost clocks and no latency or occupancy limits: an upper bound, not a prediction."
        + (f" before: {before_label}." if before_label else "")
        + "\n\n"
    )


def write_csv(rows: List[Row], f) -> None:
    w = csv.writer(f)
    cols = [k for k in asdict(rows[0]) if k != "detail"] if rows else []
    w.writerow(cols + [f"{d} ceiling" for d in DEVICES])
    for r in rows:
        rf = roofline(r)
        w.writerow(
            [getattr(r, c) for c in cols] + [f"{rf[d]['ceiling']:.3f}" if d in rf else "" for d in DEVICES]
        )


_STORE_DTYPES = {
    "bf16": "bfloat16",
    "bfloat16": "bfloat16",
    "c10::BFloat16": "bfloat16",
    "fp16": "float16",
    "float16": "float16",
    "c10::Half": "float16",
    "fp32": "float32",
    "float32": "float32",
    "float": "float32",
    "fp64": "float64",
    "float64": "float64",
    "double": "float64",
}


def store_rows(rows: List[Row]) -> int:
    """Store rows (suite sass, device sm_XX), judged by GOALS: registers and spill bytes of every kernel
    instance; instructions per element of the headline instances only (widest loads, most threads per
    row: the launch of large vocabularies). The other instances are fallbacks (VEC = 1: a pointer not
    aligned to its element size) or small-row launches; their figures are in --json / --csv."""
    commit, dirty = store.git_state()
    nvcc = (
        subprocess.run([tool("nvcc"), "--version"], capture_output=True, text=True)
        .stdout.strip()
        .splitlines()
    )
    common = dict(
        suite="sass",
        shape="",
        threads="",
        date=store.now(),
        commit=commit,
        dirty=dirty,
        machine=f"static SASS, {nvcc[-1] if nvcc else 'nvcc'}",
        torch="",
    )
    out, heads = [], {id(r) for r in headline(rows)}
    for r in rows:
        base = dict(
            common,
            case=r.family,
            variant=r.kernel,
            dtype=_STORE_DTYPES.get(r.dtype, r.dtype),
            device=f"sm_{r.arch}",
        )
        metrics = [("spill_bytes", r.spill_stores + r.spill_loads, "B"), ("regs", r.regs, "")]
        if r.instr_per_elem and id(r) in heads:
            metrics += [
                ("instr_per_elem", round(r.instr_per_elem, 2), "instr/elem"),
                ("half_per_elem", round(r.half_per_elem, 2), "instr/elem"),
            ]
        out += [store.row(**base, metric=m, value=v, unit=u) for m, v, u in metrics]
    for m in inflight(rows):  # the bytes-in-flight model: a line per launch class, dtype and device
        base = dict(
            common,
            case=INFLIGHT_CASE,
            variant=m["launch"],
            dtype=_STORE_DTYPES[m["dtype"]],
            device=m["device"],
        )
        out += [store.row(**base, metric=k, value=m[k], unit=u) for k, u in INFLIGHT_METRICS.items()]
    return store.append(out)


# The suite's section of RESULTS.md (benchmarks/render.py) and the static goals --check enforces:
# the bf16 and fp32 main loops of these families (headline instances) and spills of any kernel
# instance. fp32 has the tighter budget: half the elements per byte of HBM, and its exact exponent
# difference (one FADD more than bf16's single FFMA) must still leave the loop memory-bound.
TITLE = "CUDA kernels, static: registers, spills and SASS instructions per element"
LATEST_RUN = True  # kernels come and go with the code: the latest build per architecture stands alone
NOTES = """
Read from the compiled code, no GPU (`python -m tools.sass_report --store`; device: the SASS architecture,
the latest build of each): regs and spill_bytes (spill stores + loads) of every kernel instance;
instr_per_elem, the instructions per element on the main loop's hot path, of the headline instances only
(the widest loads and the most threads per row: the launch of large vocabularies), half_per_elem of them
on a half-rate pipe. `tools/sass_report.py` explains the count.

*bytes in flight (model)*: per launch-shape class (the launch `dispatch_shape` and the split decision take
for that C), dtype and device, Little's law applied to the compiled code (`inflight()` in
`tools/sass_report.py`): blocks_per_sm from the instance's registers, threads and shared memory;
loads_per_thread, the 16-byte loads (2- or 4-byte on the scalar path) its main loop issues before it
uses one, read off the SASS (the fewest over the loop's copies); trips, the round trips to DRAM a row
(a slice on the split launch) takes; waits_first_load 1 where the row's loads wait for targets[row]
(scale[row] for input sqnorm) first, one round trip more; kib_in_flight per SM; tolerated_ns, the largest
DRAM latency at which those bytes still keep HBM busy; hbm_pct, the fraction of HBM bandwidth they allow
at an assumed 600 ns (bandwidths from NVIDIA's datasheets: H100 SXM 3.35 TB/s, H200 4.8 TB/s, A100 SXM
80GB 2.039 TB/s; the latency an assumption, checked by `tools/gpu_bench.py`'s latency case on a GPU).
Launch gaps, the finish kernel and issue limits are outside it: a prediction to measure, not a result.
"""
CHECKED = ("forward", "backward", "forward (split)", "gradient (split)")
BY_CASE = True  # a table per kernel family, and the bytes-in-flight model's own
INFLIGHT_CASE = "bytes in flight (model)"
INFLIGHT_METRICS = {  # the model's figures stored, with their units
    **dict.fromkeys(("blocks_per_sm", "loads_per_thread", "trips", "waits_first_load"), "count"),
    "kib_in_flight": "KiB",
    "tolerated_ns": "ns",
    "hbm_pct": "%",
}


def worst(metric: str, **match):
    """Per architecture, the largest ``metric`` over the matching kernel instances."""

    def figure(rows):
        rows = select(rows, metric, match)
        return [
            (f"{arch}: worst of {g.variant.nunique()}", g.value.max(), g, "")
            for arch, g in rows.groupby("device")
        ]

    return figure


COMMAND = "python -m tools.sass_report --store"
GOALS = [
    Goal("forward main loop ≤ 10 SASS instructions per bf16 element, every arch", "cuda",
         worst("instr_per_elem", case="forward", dtype="bfloat16"), "<=", 10.0, "{:.1f}", COMMAND),
    Goal("backward main loop ≤ 10 SASS instructions per bf16 element, every arch", "cuda",
         worst("instr_per_elem", case="backward", dtype="bfloat16"), "<=", 10.0, "{:.1f}", COMMAND),
    Goal("forward main loop ≤ 8 SASS instructions per fp32 element, every arch", "cuda",
         worst("instr_per_elem", case="forward", dtype="float32"), "<=", 8.0, "{:.1f}", COMMAND),
    Goal("backward main loop ≤ 8 SASS instructions per fp32 element, every arch", "cuda",
         worst("instr_per_elem", case="backward", dtype="float32"), "<=", 8.0, "{:.1f}", COMMAND),
    Goal("no register spills in any CUDA kernel, every arch", "cuda", worst("spill_bytes"), "<=", 0.0, "{:.0f} B",
         COMMAND),
]  # fmt: skip
# instructions per element allowed in the CHECKED main loops, by dtype (the GOALS' thresholds)
MAX_INSTR_PER_ELEM = {"bf16": GOALS[0].threshold, "fp32": GOALS[2].threshold}
# The options route's main loops (bf16, fp32 headline instances), judged by the roofline model
# rather than a count: the smallest fraction of HBM bandwidth their issue rate allows on each device
# of their architecture. Without soft-capping they must stay memory-bound (100%); its tanh (an ex2,
# an rcp and three FP ops per element, in both passes) may cost the forward a quarter of the
# bandwidth on an H100 / A100: a 16-bit forward is issue-bound there, and more so on an H200, whose
# faster HBM gives each element fewer issue slots (the goal is checked on the devices listed).
MIN_CEILING = {
    "forward (options)": 1.0,
    "backward (options)": 1.0,
    "forward (options, softcap)": 0.75,
    "backward (options, softcap)": 1.0,
}
CEILING_DEVICES = ("H100 SXM", "A100 SXM 80GB")


def check(rows: List[Row]) -> List[str]:
    """What breaks the static goals: spilling instances (any kernel, any dtype), bf16 / fp32
    headline main loops over their MAX_INSTR_PER_ELEM instructions per element, and options-route
    loops whose issue rate allows less than MIN_CEILING of HBM bandwidth on CEILING_DEVICES."""
    out = []
    bad = [r for r in rows if r.spill_stores or r.spill_loads or r.local]
    if bad:
        out.append(f"{len(bad)} kernel instances spill: " + ", ".join(sorted({r.kernel for r in bad})[:8]))
    for r in headline(rows):
        limit = MAX_INSTR_PER_ELEM.get(r.dtype)
        if r.family in CHECKED and limit is not None and r.instr_per_elem > limit:
            out.append(
                f"sm_{r.arch} {r.family} {r.dtype}: {r.instr_per_elem:.1f} instructions per element "
                f"(goal <= {limit:g}): {r.kernel}"
            )
        floor = MIN_CEILING.get(r.family)
        if floor is not None and r.dtype in MAX_INSTR_PER_ELEM:
            for dev, rf in roofline(r).items():
                if dev in CEILING_DEVICES and rf["ceiling"] < floor - 1e-9:
                    out.append(
                        f"sm_{r.arch} {r.family} {r.dtype}: issue rate allows {100 * rf['ceiling']:.0f}% of {dev}'s "
                        f"HBM bandwidth (goal >= {100 * floor:.0f}%): {r.kernel}"
                    )
    missing = [
        f"{f} {d}"
        for f in CHECKED + tuple(MIN_CEILING)
        for d in MAX_INSTR_PER_ELEM
        if not any(r.family == f and r.dtype == d for r in rows)
    ]
    if missing:  # a renamed kernel must not pass the check by disappearing from it
        out.append("no instance found for " + ", ".join(missing))
    return out


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--arch", nargs="+", default=["90", "80"], help="SASS architectures (default 90 80)")
    ap.add_argument("--src", nargs="+", default=None, help="CUDA sources (default csrc/cuda/*.cu)")
    ap.add_argument("--work", default=None, help="keep cubins and SASS here (default: a temporary folder)")
    ap.add_argument(
        "--cubin", nargs="+", default=None, help="analyse these cubins (name.sm_XX.cubin) instead of building"
    )
    ap.add_argument("--json", help="write every kernel instance's row (with loop details) here")
    ap.add_argument("--csv", help="write every kernel instance's row here ('-': stdout)")
    ap.add_argument("--markdown", help="write the headline table with its preamble here (default: stdout)")
    ap.add_argument("--jobs", type=int, default=int(os.environ.get("MAX_JOBS", "2")))
    ap.add_argument("--before", help="an earlier run's --json: its figures go beside the new ones")
    ap.add_argument("--before-label", help="what the --before run measured (a line in the preamble)")
    ap.add_argument(
        "--store",
        action="store_true",
        help="append the figures to benchmarks/results.csv (suite sass), for RESULTS.md",
    )
    ap.add_argument(
        "--check",
        action="store_true",
        help=f"exit 1 when a kernel instance spills or a {'/'.join(CHECKED)} main loop takes more instructions "
        "per element than "
        + ", ".join(f"{v:g} ({d})" for d, v in MAX_INSTR_PER_ELEM.items())
        + " (the static GOALS; run by tools/check_cuda_build.sh)",
    )
    args = ap.parse_args(argv)

    work = args.work or tempfile.mkdtemp(prefix="memcore-sass-")
    os.makedirs(work, exist_ok=True)
    jobs: List[Tuple[str, str, str, str]] = []  # (arch, source, cubin, log)
    if args.cubin:
        for c in args.cubin:
            m = re.search(r"sm_(\d+)", c)
            logf = c + ".ptxas.log"
            log = open(logf).read() if os.path.exists(logf) else ""
            jobs.append((m.group(1) if m else "90", c, c, log))
    else:
        srcs = args.src or sorted(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu")))
        todo = [(a, s) for a in args.arch for s in srcs]
        with ThreadPoolExecutor(max(1, args.jobs)) as ex:
            built = list(ex.map(lambda t: build(t[1], t[0], work), todo))
        for (a, s), (cubin, log) in zip(todo, built):
            with open(cubin + ".ptxas.log", "w") as f:
                f.write(log)
            jobs.append((a, s, cubin, log))
    rows: List[Row] = []
    for arch, src, cubin, log in jobs:
        rows += analyse(arch, src, cubin, log)
    if args.json:
        with open(args.json, "w") as f:
            json.dump([dict(asdict(r), roofline=roofline(r)) for r in rows], f, indent=1)
    if args.csv:
        if args.csv == "-":
            write_csv(rows, sys.stdout)
        else:
            with open(args.csv, "w", newline="") as f:
                write_csv(rows, f)
    before = None
    if args.before:
        with open(args.before) as f:
            before = json.load(f)
    md = markdown(rows, before)
    md += (
        f"\nBytes in flight per SM and Little's law ({INFLIGHT_CASE}, `inflight()`):\n\n"
        + inflight_markdown(inflight(rows))
    )
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write("# SASS report\n\n" + preamble(args.before_label) + md)
    else:
        sys.stdout.write(md)
    if args.store:
        print(f"sass_report: {store_rows(rows)} rows appended to {store.STORE}", file=sys.stderr)
    problems = check(rows)
    for p in problems:
        print(f"sass_report: {p}", file=sys.stderr)
    return 1 if problems and args.check else 0


if __name__ == "__main__":
    sys.exit(main())
