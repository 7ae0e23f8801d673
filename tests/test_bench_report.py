"""benchmarks/render.py and store.py: goals judged as printed, the choice between clean and modified
trees, the generic table, and RESULTS.md up to date with the store."""

import math
import subprocess
from pathlib import Path

import pytest

pd = pytest.importorskip("pandas")
from benchmarks import render, store  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CLEAN = dict(
    commit="a" * 40, dirty="0", date="2026-01-02T03:04:05Z", torch="2.0", machine="Test CPU, 8 cores"
)


def ce(shape, variant, ms, **kw):
    fields = dict(CLEAN, suite="cross_entropy", case="loss", variant=variant, shape=shape, dtype="float32")
    return store.row(**dict(fields, device="cpu", threads=2, **kw), metric="median_ms", value=ms, unit="ms")


def published(tmp_path, rows):
    path = tmp_path / "results.csv"
    path.unlink(missing_ok=True)
    store.append(rows, path)
    return render.render(render.load(path))


def goal_line(text, start, case=""):
    return next(ln for ln in text.splitlines() if ln.startswith(f"| {start}") and f"| {case}" in ln)


ROWS = [
    ce("512x10", "plain", 1.0),
    ce("512x10", "eager", 3.0),
    ce("512x10", "memcore", 1.104),  # 1.10 as printed
    ce("4096x1000", "plain", 10.0),
    ce("4096x1000", "eager", 40.0),
    ce("4096x1000", "memcore", 5.0),
]


def test_goals_judged_per_case_as_printed(tmp_path):
    text = published(tmp_path, ROWS)
    line = goal_line(text, "accumulate fwd+bwd ≤ 1.10x plain", "512x10 float32")
    assert line.endswith("| cpu (Test CPU, 8 cores) | 1.10x | 2026-01-02 | ✓ |")
    assert goal_line(text, "accumulate ≥ 1.5x faster", "4096x1000").endswith("| 8.00x | 2026-01-02 | ✓ |")
    # CPU figures never judge a GPU goal: it says what measures it
    gpu = goal_line(text, "accumulate ≥ 2x faster than the eager statistics")
    assert (
        "| cuda | not measured: `MEMCORE_PY=python3 bash scripts/bench.sh --full -k cuda` |" in gpu
        and gpu.endswith("| — |")
    )
    slow = published(tmp_path, ROWS + [ce("4096x1000", "memcore", 11.5, date="2026-02-01T00:00:00Z")])
    assert goal_line(slow, "accumulate fwd+bwd ≤ 1.10x plain", "4096x1000").endswith(
        "| 1.15x | 2026-01-02, 2026-02-01 | ✗ |"
    )
    assert "4 met, 0 missed" in text and "3 met, 1 missed" in slow


def test_generic_table_a_line_per_variant_and_shape(tmp_path):
    text = published(tmp_path, ROWS)
    section = text[text.index("## Cross-entropy kernel") :]
    # what every line shares is said once; a line per variant and shape (numeric order), a column per metric
    assert (
        "- dtype: float32; device: cpu; threads: 2; machine: Test CPU, 8 cores; torch: 2.0; date: 2026-01-02"
        in section
    )
    assert "| variant | shape | median_ms |" in section
    lines = [ln for ln in section.splitlines() if ln.startswith("| memcore |")]
    assert lines == ["| memcore | 512x10 | 1.10 |", "| memcore | 4096x1000 | 5.00 |"]


def test_a_modified_tree_never_replaces_a_clean_figure(tmp_path):
    rows = ROWS + [ce("4096x1000", "memcore", 50.0, dirty="1", date="2026-03-01T00:00:00Z")]
    rows += [
        ce("8192x32000", v, t, dirty="", commit="", date="2026-01-03T00:00:00Z")
        for v, t in (("plain", 1), ("memcore", 5))
    ]
    text = published(tmp_path, rows)
    assert "| memcore | 4096x1000 | 5.00 | 2026-01-02 | aaaaaaa |" in text  # the older clean figure stands
    assert "| memcore | 8192x32000 | 5.00 | 2026-01-03 | unrecorded |" in text  # no clean one: shown, marked
    assert goal_line(text, "accumulate fwd+bwd ≤ 1.10x plain", "8192x32000").endswith("| ✗ |")
    only_dirty = published(
        tmp_path, [ce("512x10", v, t, dirty="1") for v, t in (("plain", 1.0), ("memcore", 1.0))]
    )
    assert "commit: aaaaaaa+dirty" in only_dirty


def experiment(top_pearson, **extra):
    base = dict(CLEAN, suite="stability", case="agreement", variant="csl", shape="mnist, K=128", device="cpu")
    figures = {"cosine top 400": 0.925, "pearson top 400": top_pearson, "pearson all": 0.80, **extra}
    return [store.row(**base, metric=m, value=v) for m, v in figures.items()]


def test_cosine_on_a_constant_top_k_gets_no_verdict(tmp_path):
    text = published(tmp_path, experiment(math.nan))
    line = goal_line(text, "cosine(CSL, memorization) on the top-k")
    assert "n/a: the estimate is 1.0 on every top-k sample" in line and line.endswith("| — |")
    assert goal_line(text, "Pearson(CSL, memorization) on all").endswith("| 0.800 | 2026-01-02 | ✓ |")
    assert "not measured: `python -m memcore experiment" in goal_line(text, "CSL ranks the most-memorized")
    text = published(tmp_path, experiment(0.5, **{"spearman top 400": 0.6}))
    assert goal_line(text, "cosine(CSL, memorization) on the top-k").endswith("| 0.925 | 2026-01-02 | ✓ |")
    assert goal_line(text, "CSL ranks the most-memorized").endswith("| 0.600 | 2026-01-02 | ✗ |")


def sass(arch, case, dtype, metric, v, date=CLEAN["date"]):
    fields = dict(CLEAN, suite="sass", case=case, variant=f"{case}_kernel<{dtype}>", dtype=dtype, date=date)
    return store.row(**fields, device=f"sm_{arch}", metric=metric, value=v)


def test_static_goals_worst_per_arch_on_the_latest_build(tmp_path):
    rows = [
        sass(80, "commit", "float32", "spill_bytes", 16),  # a kernel absent from the later build
        sass(90, "forward", "bfloat16", "instr_per_elem", 5.8, date="2026-02-01T00:00:00Z"),
        sass(80, "forward", "bfloat16", "instr_per_elem", 12.0, date="2026-02-01T00:00:00Z"),
        sass(80, "backward", "float32", "spill_bytes", 0, date="2026-02-01T00:00:00Z"),
    ]
    text = published(tmp_path, rows)
    assert goal_line(text, "forward main loop ≤ 10 SASS", "sm_80").endswith("| 12.0 | 2026-02-01 | ✗ |")
    assert goal_line(text, "forward main loop ≤ 10 SASS", "sm_90").endswith("| 5.8 | 2026-02-01 | ✓ |")
    assert "commit_kernel" not in text and goal_line(text, "no register spills").endswith(
        "| 0 B | 2026-02-01 | ✓ |"
    )
    assert "not measured: `python -m tools.sass_report --store`" in goal_line(text, "backward main loop")


def test_pytest_benchmark_document_to_rows_and_git_state(tmp_path):
    info = dict(
        suite="scaling", cases=["loss vs C", "loss vs N"], variant="memcore", shape="8x4", dtype="float32"
    )
    doc = {
        "datetime": "2026-01-02T03:04:05+00:00",
        "machine_info": {"memcore": {"torch_version": "2.0", "cpu_model": "X", "cpu_count": 4}},
        "benchmarks": [
            {
                "stats": {"median": 0.002, "iqr": 0.0, "rounds": 7},
                "extra_info": dict(info, device="cpu", threads=1, figures={"peak_mib": [1.5, "MiB"]}),
            },
            {"stats": {"median": 1.0}, "extra_info": {"variant": "no suite: not stored"}},
        ],
    }
    rows = store.rows_from_pytest(doc, "c" * 40, "1")
    got = [(r["case"], r["metric"], float(r["value"])) for r in rows]
    one = [("median_ms", 2.0), ("iqr_ms", 0.0), ("rounds", 7), ("peak_mib", 1.5)]
    assert got == [(c, m, v) for c in ("loss vs C", "loss vs N") for m, v in one]
    assert (
        rows[0]["machine"] == "X, 4 cores"
        and rows[0]["dirty"] == "1"
        and rows[0]["date"] == "2026-01-02T03:04:05Z"
    )
    git = lambda *a: subprocess.run(["git", "-C", str(tmp_path), *a], check=True, capture_output=True)  # noqa: E731
    git("init", "-q")
    (tmp_path / "f.txt").write_text("1")
    git("add", "f.txt")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "x")
    assert store.git_state(tmp_path)[1] == "0"
    (tmp_path / "f.txt").write_text("2")
    commit, dirty = store.git_state(tmp_path)
    assert len(commit) == 40 and dirty == "1"


def test_every_suite_declares_its_section_and_goals():
    names = {p.stem[len("bench_") :] for p in (ROOT / "benchmarks").glob("bench_*.py")}
    assert names <= set(render.SUITES) and set(render.load().suite) <= set(render.SUITES)
    for mod, _ in render.suites(render.load()):
        assert mod.TITLE and mod.NOTES.strip() and all(g.op in ("<=", ">=") for g in mod.GOALS)


def test_results_md_is_up_to_date_with_the_store():
    assert render.render(render.load()) == (ROOT / "benchmarks" / "RESULTS.md").read_text(), (
        "run `python -m benchmarks.render`"
    )


def _sass_row(family, dtype="bf16", instr=6.0, spill=0):
    from tools import sass_report

    fields = dict(arch="90", source="cross_entropy.cu", kernel=f"{family.split()[0]}_kernel<{dtype}, 512, 8>")
    return sass_report.Row(
        **fields,
        family=family,
        dtype=dtype,
        regs=40,
        stack=0,
        local=0,
        spill_stores=spill,
        spill_loads=spill,
        loops=1,
        elem_per_iter=32.0,
        instr_per_elem=instr,
        half_per_elem=1.0,
        mufu_per_elem=1.0,
        cycles_per_elem=2.0,
        bytes_per_elem=2.0,
        per_row_instr=0,
        detail=[{"elems": 32}],
    )


def test_sass_check_flags_spills_slow_loops_and_missing_kernels():
    """sass_report --check (run by the CUDA build check): clean rows pass; a spill in any dtype, a bf16
    main loop over 10 instructions per element, an fp32 one over 8, or a checked family absent from
    the build fails."""
    from tools import sass_report

    families = sass_report.CHECKED + tuple(sass_report.MIN_CEILING)
    clean = [_sass_row(f, dtype=d) for f in families for d in ("bf16", "fp32")]
    clean.append(_sass_row("forward", dtype="fp64", instr=44.0))
    assert sass_report.check(clean) == []
    # an options loop whose issue rate leaves HBM idle fails by the roofline, not by a count
    import dataclasses

    issue_bound = [
        dataclasses.replace(r, cycles_per_elem=200.0) if r.family == "forward (options, softcap)" else r
        for r in clean
    ]
    assert any("forward (options, softcap) bf16" in p and "HBM" in p for p in sass_report.check(issue_bound))
    assert any("spill" in p for p in sass_report.check(clean + [_sass_row("commit", dtype="fp64", spill=16)]))
    slow = [
        r if (r.family, r.dtype) != ("backward", "bf16") else _sass_row("backward", instr=10.5) for r in clean
    ]
    assert any("backward bf16: 10.5" in p for p in sass_report.check(slow))
    # 9 instructions: within bf16's budget, over fp32's
    fp32 = [
        r if (r.family, r.dtype) != ("forward", "fp32") else _sass_row("forward", "fp32", 9.0) for r in clean
    ]
    assert [p for p in sass_report.check(fp32) if "forward fp32: 9.0" in p]
    assert (
        sass_report.check(
            [
                _sass_row("forward", "bf16", 9.0) if r.family == "forward" and r.dtype == "bf16" else r
                for r in clean
            ]
        )
        == []
    )
    gone = [r for r in clean if r.family != "forward (split)"]
    assert any("forward (split)" in p for p in sass_report.check(gone))
    assert any(
        "backward fp32" in p
        for p in sass_report.check([r for r in clean if r.dtype != "fp32" or r.family != "backward"])
    )
