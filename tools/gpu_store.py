"""Turns what the two GPU calls wrote to their output folders into rows of the results store
(suite "gpu"), and declares that suite's part of RESULTS.md (TITLE, NOTES, GOALS, BY_CASE).

    python -m tools.gpu_store OUT_CHECK [OUT_BENCH ...]   # then: python -m benchmarks.render

An output folder of tools/gpu_check.sh gives one line per check (the CUDA tests' counts from
their JUnit reports, the bitwise repeats, the kernel coverage, each compute-sanitizer tool's error count);
one of tools/gpu_bench.sh gives every figure of results.jsonl (tools/gpu_bench.py). The rows carry
the local checkout's commit when the measured tree is the same code (tree_digest of the sources,
recorded by the run, equals the local one); otherwise they are stored as "unrecorded" and a warning
says so (--commit names the commit instead).
"""

import argparse
import hashlib
import json
import os
import re
import sys
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Dict, List, Optional, Sequence

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script: the repository root holds benchmarks/
    sys.path.insert(0, str(ROOT))
from benchmarks import store  # noqa: E402
from benchmarks.goals import Goal, value  # noqa: E402

SOURCES = ("csrc", "memcore", "tools", "benchmarks", "setup.py")
SKIP = ("benchmarks/results.csv", "benchmarks/RESULTS.md", "benchmarks/scaling.png")


def tree_digest(root: Path = ROOT) -> str:
    """sha256 (16 hex digits) over the names and contents of the source files the GPU figures depend
    on (csrc, memcore, tools, benchmarks, setup.py; build outputs and the store left out)."""
    h = hashlib.sha256()
    for top in SOURCES:
        p = root / top
        for f in [p] if p.is_file() else sorted(q for q in p.rglob("*") if q.is_file()):
            rel = f.relative_to(root).as_posix()
            if "__pycache__" in rel or f.suffix in (".so", ".pyc", ".o") or rel in SKIP:
                continue
            h.update(rel.encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()[:16]


# results.jsonl field -> (store metric, unit)
FIGURES = {
    "ms": ("median_ms", "ms"),
    "gbs": ("bandwidth", "GB/s"),
    "pct_copy": ("of_copy", "%"),
    "slices": ("slices", "count"),
    "latency_ns": ("latency", "ns"),
    "tflops": ("throughput", "TFLOP/s"),
    "peak_mib": ("peak", "MiB"),
    "peak_vs_plain": ("peak_vs_plain", "x"),
    "compile_s": ("compile", "s"),
    "loss_err": ("loss_err", ""),
    "grad_err": ("grad_err", ""),
    "grad_hidden_err": ("grad_hidden_err", ""),
    "grad_weight_err": ("grad_weight_err", ""),
    "sqnorm_err": ("sqnorm_err", ""),
}


def _jsonl(path: Path) -> List[dict]:
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:  # a line cut short by a timeout
            pass
    return out


def bench_rows(folder: Path, common: dict) -> List[Dict[str, str]]:
    recs = _jsonl(folder / "results.jsonl")
    rows = []
    for r in recs:
        if "variant" not in r or "error" in r or "skipped" in r:
            continue
        base = dict(common, case=r["case"], variant=r["variant"], shape=r.get("shape", ""), dtype=r.get("dtype", ""),
                    device=r["device"], machine=r["device"])  # fmt: skip
        for field, (metric, unit) in FIGURES.items():
            if r.get(field) is not None:
                rows.append(store.row(**base, metric=metric, value=r[field], unit=unit))
    return rows


def _sanitizer_errors(log: Path) -> Optional[int]:
    """compute-sanitizer's "ERROR SUMMARY: N errors" (racecheck: "RACECHECK SUMMARY: N hazards
    displayed (E errors, W warnings)"); None where the log has no summary (skipped, cut short)."""
    if not log.exists():
        return None
    text = log.read_text(errors="replace")
    m = re.findall(r"ERROR SUMMARY: (\d+) error", text)
    if m:
        return sum(int(x) for x in m)
    m = re.findall(r"RACECHECK SUMMARY: \d+ hazards? displayed \((\d+) errors?", text)
    return sum(int(x) for x in m) if m else None


def check_rows(folder: Path, common: dict, gpu: str) -> List[Dict[str, str]]:
    base = dict(common, case="check", device=gpu, machine=gpu)
    rows = []

    def add(variant: str, metric: str, v, unit: str = "count") -> None:
        rows.append(store.row(**base, variant=variant, metric=metric, value=v, unit=unit))

    suites = []
    for xml in sorted(folder.glob("tests*.xml")):  # one JUnit report per shard of the test stage
        try:
            root = ET.parse(xml).getroot()
        except ET.ParseError:  # cut short while written
            continue
        suites += [root] if root.tag == "testsuite" else list(root)
    if suites:
        total = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
        failed = total["failures"] + total["errors"]
        add("CUDA tests", "passed", total["tests"] - failed - total["skipped"])
        add("CUDA tests", "failed", failed)
        add("CUDA tests", "skipped", total["skipped"])
    reps = [r for name in ("repeat-1.jsonl", "repeat-2.jsonl") for r in _jsonl(folder / name)]
    if reps:
        add("bitwise repeats", "cases", len({r["case"] for r in reps}))
        bad = {
            r["case"]
            for r in reps
            if "error" in r or not r.get("repeat") or r.get("across_processes") is False
        }
        add("bitwise repeats", "differing", len(bad))
    cov = [r for r in _jsonl(folder / "kernels.jsonl") if r.get("case") == "coverage"]
    if cov:
        add("kernel coverage", "kernels", len(cov[-1]["kernels"]))
        add("kernel coverage", "never_launched", len(cov[-1]["never_launched"]))
    for tool in ("memcheck", "racecheck", "synccheck"):
        n = _sanitizer_errors(folder / f"{tool}.log")
        if n is not None:
            add(f"compute-sanitizer {tool}", "errors", n)
    return rows


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument(
        "folders", nargs="+", type=Path, help="$OUT of tools/gpu_check.sh and/or tools/gpu_bench.sh"
    )
    ap.add_argument("--commit", help="the commit the run measured (default: the local one, if the same code)")
    ap.add_argument("--note", default=os.environ.get("MEMCORE_BENCH_NOTE", ""), help="conditions of the run")
    ap.add_argument("--store", type=Path, default=store.STORE)
    args = ap.parse_args(argv)
    here = tree_digest()
    rows = []
    for folder in args.folders:
        env = {}
        if (folder / "env.json").exists():
            env = json.loads((folder / "env.json").read_text())
        setup = next((r for r in _jsonl(folder / "results.jsonl") if r.get("case") == "setup"), {})
        tree = setup.get("tree") or env.get("tree")
        date = setup.get("date") or env.get("date") or store.now()
        if args.commit:
            commit, dirty = args.commit, "0"
        elif tree and tree == here:
            commit, dirty = store.git_state()
        else:
            commit, dirty = "", ""
            print(f"gpu_store: {folder} measured other code than this checkout (tree {tree} != {here}): "
                  "stored as unrecorded; --commit names its commit", file=sys.stderr)  # fmt: skip
        common = dict(suite="gpu", date=date, torch=setup.get("torch") or env.get("torch", ""), commit=commit,
                      dirty=dirty, note=args.note, threads="")  # fmt: skip
        gpu = env.get("gpu") or setup.get("device") or ""
        got = bench_rows(folder, common) + (check_rows(folder, common, gpu) if gpu else [])
        print(f"gpu_store: {len(got)} rows from {folder}", file=sys.stderr)
        rows += got
    store.append(rows, args.store)
    return 0 if rows else 1


# ---- the suite's part of RESULTS.md (benchmarks/render.py)
TITLE = "GPU run: checks, and bandwidth per launch shape against the D2D copy"
BY_CASE = True
NOTES = """
From the two GPU calls of DEVELOPMENT.md, "GPU runs" (`tools/gpu_check.sh`, `tools/gpu_bench.sh`), stored
with `python -m tools.gpu_store`. *check*: the CUDA tests (`pytest -m cuda`), bit-for-bit repeats of
ce_forward_reduce and tracker scores across two runs and two processes (`tools/gpu_repeat.py`), the
kernels of csrc/cuda that `tools/launch_all.py` launched, and compute-sanitizer's errors over it. The
bandwidth tables: one per launch-shape class of the cross-entropy kernels, bf16; *copy* is a
device-to-device copy of the same logits, *forward* `ce_forward` (the logits read once), *fwd+bwd*
`ce_forward` + `ce_backward` (three passes), *overwrite* `ce_forward_grad_` (two passes at the least);
bandwidth counts those passes, of_copy is its percentage of the copy's. *forward, split off*: the
split class's rows padded with ignored rows to as many rows as SMs, which takes the block-per-row
launch. *latency*: one thread chasing pointers through 512 MiB (the DRAM latency
`tools/sass_report.py`'s model assumes). loss_err / grad_err: largest difference from
F.cross_entropy in fp32 over the first and last rows.
"""
CHECK = "bash tools/gpu_check.sh, then python -m tools.gpu_store"
# (wording, metric of the check lines): each met at 0 on every line that has the metric
GOAL_CHECKS = [
    ("CUDA tests: none fails", "failed"),
    ("compute-sanitizer memcheck, racecheck, synccheck: no error", "errors"),
    ("ce_forward_reduce and tracker scores repeat bit for bit", "differing"),
    ("every kernel of csrc/cuda launched by the sanitized script", "never_launched"),
]
GOALS = [
    Goal(wording, "cuda", value(metric, label="{variant}", case="check"), "<=", 0.0, "{:.0f}", CHECK)
    for wording, metric in GOAL_CHECKS
]


if __name__ == "__main__":
    sys.exit(main())
