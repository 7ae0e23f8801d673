"""The benchmark store: benchmarks/results.csv, one tidy row per measured figure.

Every suite appends here (the pytest suites through ``--bench-store`` in conftest.py, the curvature
script through ``append``); ``python -m benchmarks.render`` turns the store into RESULTS.md. Each row
carries the git commit and whether the working tree had changes, so a run of modified code can be
told apart (and is not published by default).
"""

import csv
import datetime as _dt
import os
import platform
import subprocess
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Tuple

ROOT = Path(__file__).resolve().parent.parent
STORE = Path(__file__).resolve().parent / "results.csv"
COLUMNS = (
    "suite",
    "case",
    "variant",
    "shape",
    "dtype",
    "device",
    "machine",
    "threads",
    "metric",
    "value",
    "unit",
    "date",
    "torch",
    "commit",
    "dirty",
    "note",
)
OUTPUTS = ("benchmarks/results.csv", "benchmarks/RESULTS.md", "benchmarks/scaling.png")  # not "changes"


def git_state(root: Path = ROOT) -> Tuple[str, str]:
    """(commit, dirty) of ``root``: dirty "1" when a tracked file differs from that commit (the
    store and its rendered outputs excepted), "0" when clean; ("", "") outside a git checkout."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True
        ).stdout.strip()
        status = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=root,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.splitlines()
    except (OSError, subprocess.CalledProcessError):
        return "", ""
    changed = [line[3:] for line in status if line[3:] not in OUTPUTS]
    return commit, "1" if changed else "0"


def cpu_model() -> str:
    """CPU model name from /proc/cpuinfo (Linux), else platform.processor()."""
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            model = next(
                (ln.split(":", 1)[1].strip() for ln in f if ln.lower().startswith("model name")), model
            )
    except OSError:
        pass
    return model


def machine(device: str, gpu: Optional[str] = None) -> str:
    """The device in words: the GPU's name, or the CPU model and core count."""
    return gpu or f"{cpu_model()}, {os.cpu_count()} cores"


def now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def row(**fields) -> Dict[str, str]:
    """One store row; missing columns are empty."""
    unknown = set(fields) - set(COLUMNS)
    if unknown:
        raise ValueError(f"unknown store columns: {sorted(unknown)}")
    return {c: "" if fields.get(c) is None else str(fields[c]) for c in COLUMNS}


def append(rows: Iterable[Dict[str, str]], path: os.PathLike = STORE) -> int:
    """Appends ``rows`` to the CSV at ``path`` (header written when new); returns how many."""
    rows = list(rows)
    path = Path(path)
    new = not path.exists() or path.stat().st_size == 0
    with open(path, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS, lineterminator="\n")
        if new:
            w.writeheader()
        w.writerows(rows)
    return len(rows)


def _timing(base: dict, stats: dict) -> List[Dict[str, str]]:
    return [
        row(**base, metric="median_ms", value=1e3 * float(stats["median"]), unit="ms"),
        row(**base, metric="iqr_ms", value=1e3 * float(stats.get("iqr", 0.0)), unit="ms"),
        row(**base, metric="rounds", value=int(stats.get("rounds", 0)), unit="count"),
    ]


def rows_from_benchmark(bench: dict, common: dict) -> List[Dict[str, str]]:
    """The rows of one pytest-benchmark entry (its ``stats`` and ``extra_info``); ``common`` holds
    date, torch, commit, dirty, note. Benchmarks without a ``kernel`` in extra_info give none."""
    info, stats = bench.get("extra_info") or {}, bench.get("stats") or {}
    kernel, device = info.get("kernel"), str(info.get("device", ""))
    if not kernel or not stats:
        return []
    base = dict(
        common,
        variant=info.get("variant"),
        dtype=info.get("dtype"),
        device=device,
        threads=info.get("threads"),
        shape=info.get("shape"),
    )
    base["machine"] = info.get("gpu") or common.get("machine") or machine(device)
    if kernel in ("cross_entropy", "d2d_copy"):
        base.update(suite="cross_entropy", case="loss" if kernel == "cross_entropy" else "d2d_copy")
        out = _timing(base, stats)
        if info.get("bytes_moved"):
            out.append(row(**base, metric="bytes_moved", value=int(info["bytes_moved"]), unit="B"))
        return out
    if kernel == "scaling":
        out = []
        for sweep in info.get("sweeps") or []:  # one row per table the case belongs to
            case = dict(base, suite="scaling", case=f"loss vs {sweep}")
            out += _timing(case, stats)
            if info.get("peak_mem_mb") is not None:
                out.append(row(**case, metric="peak_mib", value=info["peak_mem_mb"], unit="MiB"))
        return out
    if kernel == "tracker_scaling":
        base.update(suite="scaling", case="tracker", shape=info["num_samples"])
        out = _timing(base, stats)
        out += [
            row(**base, metric=m, value=info[k], unit="MiB")
            for m, k in (("state_mib", "state_mb"), ("peak_mib", "peak_mem_mb"))
            if info.get(k) is not None
        ]
        return out
    if kernel == "linear_cross_entropy":  # benchmarks/test_bench_linear_ce.py
        base.update(suite="linear_cross_entropy", case="fwd+bwd")
        out = _timing(base, stats)
        if info.get("peak_mib") is not None:
            out.append(row(**base, metric="peak_mib", value=info["peak_mib"], unit="MiB"))
        return out
    if kernel == "training_step":
        base.update(suite="training_step", case=info["model"])
        if info.get("variant") != "interleaved":
            return _timing(base, stats)
        out = []
        for v, e in (info.get("interleaved") or {}).items():
            out += [
                row(**dict(base, variant=v), metric="interleaved_median_ms", value=e["median_ms"], unit="ms"),
                row(**dict(base, variant=v), metric="interleaved_rounds", value=e["n"], unit="count"),
            ]
        for v, e in (info.get("overhead") or {}).items():  # median per-round ratio to plain, 95 % CI
            out += [
                row(**dict(base, variant=v), metric=f"interleaved_ratio{s}", value=e[k], unit="ratio")
                for s, k in (("", "ratio"), ("_lo", "lo"), ("_hi", "hi"))
                if e.get(k) is not None
            ]
        return out
    raise ValueError(f"benchmark {bench.get('name')!r}: unknown kernel {kernel!r} (add it to store.py)")


def rows_from_pytest(doc: dict, commit: str, dirty: str, note: str = "") -> List[Dict[str, str]]:
    """Rows of a whole pytest-benchmark document (the --benchmark-json output)."""
    when = _dt.datetime.fromisoformat(str(doc["datetime"]).replace("Z", "+00:00"))
    mc = (doc.get("machine_info") or {}).get("memcore") or {}  # written by conftest.py
    cpu = f"{mc['cpu_model']}, {mc['cpu_count']} cores" if mc.get("cpu_model") else None
    if cpu and mc.get("cpu_isa"):
        cpu += f", memcore kernels {mc['cpu_isa']}"
    common = dict(
        date=when.astimezone(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        machine=cpu,
        torch=mc.get("torch_version"),
        commit=commit,
        dirty=dirty,
        note=note,
    )
    return [r for b in doc.get("benchmarks", []) for r in rows_from_benchmark(b, common)]
