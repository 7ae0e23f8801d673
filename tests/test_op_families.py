"""DEVELOPMENT.md's "Op families" tables against the tree: every family lists each of its parts,
every listed path exists, every registered memcore:: op is listed under exactly one family (and
every listed op is registered), every tests/test_<family>*.py file is listed, and each family's
public wrapper exists. Also: the build reports whether it holds the CUDA kernels."""

import re
from pathlib import Path

import torch

import memcore

ROOT = Path(__file__).resolve().parents[1]
PARTS = (
    "ops",
    "schema",
    "CPU kernel",
    "CUDA kernel",
    "autograd",
    "fake kernel",
    "wrapper",
    "tests",
    "benchmark",
)
FAMILIES = ("cross_entropy", "linear_cross_entropy", "curvature")


def _tables():
    """{family: ({part: [backticked names]}, [public names from the heading])}."""
    text = (ROOT / "DEVELOPMENT.md").read_text()
    section = text.split("\n## Op families\n", 1)[1].split("\n## ", 1)[0]
    out = {}
    for block in section.split("\n### ")[1:]:
        heading, _, body = block.partition("\n")
        names = re.findall(r"`([^`]+)`", heading)
        rows = {}
        for line in body.splitlines():
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if len(cells) == 2 and cells[0] not in ("part", "---"):
                rows[cells[0]] = re.findall(r"`([^`]+)`", cells[1])
        out[names[0]] = (rows, names[1:])
    return out


def _benchmark_exists(family: str, path: str) -> bool:
    """bench_<family>.py, or a pytest-benchmark suite (test_bench_*.py) calling the family's wrapper."""
    if (ROOT / path).is_file():
        return True
    wrapper = {
        "cross_entropy": "accumulate(",
        "linear_cross_entropy": "linear_accumulate(",
        "curvature": "curvature(",
    }
    return any(
        re.search(rf"memcore\.{re.escape(wrapper[family])}", p.read_text())
        for p in (ROOT / "benchmarks").glob("test_bench_*.py")
    )


def test_every_family_lists_every_part():
    tables = _tables()
    assert tuple(tables) == FAMILIES
    for family, (rows, public) in tables.items():
        assert tuple(rows) == PARTS, family
        assert all(rows[p] for p in PARTS), family
        assert public, f"{family}: the heading names no public wrapper"
        for name in public:
            assert name.startswith("memcore.") and hasattr(memcore, name.split(".", 1)[1]), name


def test_listed_paths_exist():
    for family, (rows, _) in _tables().items():
        for part in PARTS:
            if part == "ops":
                continue
            paths = [n for n in rows[part] if "/" in n]
            assert paths, f"{family} {part}: no path"
            for path in paths:
                if part == "benchmark":
                    assert path == f"benchmarks/bench_{family}.py", path
                    assert _benchmark_exists(family, path), f"{family}: no benchmark"
                else:
                    assert (ROOT / path).is_file(), f"{family} {part}: {path} does not exist"


def test_every_registered_op_is_listed_once():
    listed = [op for rows, _ in _tables().values() for op in rows["ops"]]
    assert len(listed) == len(set(listed)), "an op is listed twice"
    registered = {n for n in torch._C._dispatch_get_all_op_names() if n.startswith("memcore::")}
    assert set(listed) == registered


def test_family_names_its_files():
    """Each family's tests are all listed, and its own files carry its name."""
    for family, (rows, _) in _tables().items():
        tests = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "tests").glob(f"test_{family}*.py"))
        assert sorted(rows["tests"]) == tests, family
        for part in ("CPU kernel", "CUDA kernel", "wrapper", "fake kernel"):
            own = [n for n in rows[part] if "/" in n and Path(n).stem.startswith(family)]
            assert own, f"{family} {part}: no file named for the family"


def test_with_cuda_reports_build():
    assert isinstance(memcore.with_cuda(), bool)
    if torch.cuda.is_available():
        assert memcore.with_cuda()
