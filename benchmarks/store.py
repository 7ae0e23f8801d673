"""The benchmark store: benchmarks/results.csv, one tidy row per measured figure.

Every suite appends here: the pytest suites through ``--bench-store`` (conftest.py), the scripts
(bench_curvature, bench_shard, bench_stability, tools/sass_report) through ``append``;
``python -m benchmarks.render`` turns the store into RESULTS.md. Each row carries the git commit and
whether the working tree had changes, so a figure of modified code can be told apart (RESULTS.md shows
it, marked, only where no figure of a clean tree exists).
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
COLUMNS = tuple(
    "suite case variant shape dtype device machine threads metric value unit date torch commit dirty note".split()
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


def machine(gpu: Optional[str] = None) -> str:
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


def rows_from_benchmark(bench: dict, common: dict) -> List[Dict[str, str]]:
    """The rows of one pytest-benchmark entry; ``common`` holds date, torch, commit, dirty, note.

    Its ``extra_info`` names the rows' fields (suite, case, variant, shape, dtype, device, threads;
    ``cases``: one measurement shown in several tables). A timed entry gives median_ms, iqr_ms and rounds
    from its stats; ``figures`` ({metric: (value, unit)}) and ``rows`` (field dicts, e.g. one per variant
    of an interleaved round) give the rest. Entries without a suite (not meant for the store) give none."""
    info, stats = bench.get("extra_info") or {}, bench.get("stats") or {}
    if not info.get("suite") or not stats:
        return []
    base = dict(
        common, **{k: info.get(k) for k in ("suite", "variant", "shape", "dtype", "device", "threads")}
    )
    base["machine"] = info.get("gpu") or common.get("machine") or machine()
    out = []
    for case in info.get("cases") or [info.get("case")]:
        b = dict(base, case=case)
        if info.get("timed", True):
            out += [
                row(**b, metric="median_ms", value=1e3 * float(stats["median"]), unit="ms"),
                row(**b, metric="iqr_ms", value=1e3 * float(stats.get("iqr", 0.0)), unit="ms"),
                row(**b, metric="rounds", value=int(stats.get("rounds", 0)), unit="count"),
            ]
        figures = (info.get("figures") or {}).items()
        out += [row(**b, metric=m, value=v, unit=u) for m, (v, u) in figures if v is not None]
        out += [row(**{**b, **r}) for r in info.get("rows") or []]
    return out


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
