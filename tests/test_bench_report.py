"""benchmarks/render.py and store.py on made-up rows: verdicts, dirty refusal, table layout."""

import math
import subprocess

import pytest

pd = pytest.importorskip("pandas")
from benchmarks import render, store  # noqa: E402

CLEAN = dict(
    commit="a" * 40,
    dirty="0",
    date="2026-01-02T03:04:05Z",
    torch="2.0",
    machine="Test CPU, 8 cores",
    threads=2,
    dtype="float32",
    device="cpu",
)


def ce(shape, variant, ms, **kw):
    return store.row(
        **dict(CLEAN, **kw),
        suite="cross_entropy",
        case="loss",
        variant=variant,
        shape=shape,
        metric="median_ms",
        value=ms,
        unit="ms",
    )


def step(variant, metric, value, **kw):
    return store.row(
        **dict(CLEAN, **kw),
        suite="training_step",
        case="small_cnn",
        variant=variant,
        shape="128x3x32x32",
        metric=metric,
        value=value,
        unit="",
    )


def published(tmp_path, rows, allow_dirty=False, exps=()):
    path = tmp_path / "results.csv"
    store.append(rows, path)
    df, left_out = render.load(path, allow_dirty)
    return render.render(df, list(exps), left_out, allow_dirty)


def goal_line(text, start):
    return next(ln for ln in text.splitlines() if ln.startswith(f"| {start}"))


ROWS = [
    ce("512x10", "plain", 1.0),
    ce("512x10", "eager", 3.0),
    ce("512x10", "memcore", 1.104),  # 1.10 as printed
    ce("4096x1000", "plain", 10.0),
    ce("4096x1000", "eager", 40.0),
    ce("4096x1000", "memcore", 5.0),
]


def test_worst_shape_judged_as_printed_and_pivot_layout(tmp_path):
    text = published(tmp_path, ROWS)
    line = goal_line(text, "accumulate fwd+bwd ≤ 1.10x plain")
    assert "1.10x worst (0.50x–1.10x)" in line and line.endswith("| ✓ |")
    assert goal_line(text, "accumulate ≥ 1.5x faster").split("|")[4].strip() == "2.72x worst (2.72x–8.00x)"
    # one row per shape, variants as columns in a fixed order, ratios beside them
    assert (
        "| N x C | dtype | device | threads | plain (ms) | eager (ms) | memcore (ms) | memcore / plain |"
        in text
    )
    assert "| 4096x1000 | float32 | cpu | 2 | 10.0 | 40.0 | 5.00 | 0.50 | 8.00 |" in text
    assert "aaaaaaa |" in text and "aaaaaaa+dirty" not in text
    assert (
        "| accumulate fwd+bwd ≤ 1.10x plain F.cross_entropy, every shape | #3 | cuda | not measured: `bash "
        "scripts/gpu_session.sh build bench` |  | — |" in text
    )  # CPU figures never judge a GPU goal


def test_slow_shape_fails_the_goal(tmp_path):
    text = published(tmp_path, ROWS + [ce("4096x1000", "memcore", 11.5, date="2026-02-01T00:00:00Z")])
    assert goal_line(text, "accumulate fwd+bwd ≤ 1.10x plain").endswith(
        "| 1.15x worst (1.10x–1.15x) | "
        "4096x1000 float32, 2026-01-02, 2026-02-01; "
        "512x10 float32, 2026-01-02 | ✗ |"
    )


def test_dirty_rows_are_refused_unless_allowed(tmp_path):
    rows = ROWS + [
        ce("8192x32000", s, v, dirty="1") for s, v in (("plain", 1.0), ("memcore", 5.0), ("eager", 9.0))
    ]
    rows.append(ce("4096x1000", "memcore", 50.0, dirty="1", commit="", date="2026-03-01T00:00:00Z"))
    text = published(tmp_path, rows)
    assert "8192x32000" not in text and "4 stored figures from modified or unrecorded" in text
    assert "| 4096x1000 | float32 | cpu | 2 | 10.0 | 40.0 | 5.00 |" in text  # the older clean figure stands
    assert goal_line(text, "accumulate fwd+bwd ≤ 1.10x plain").endswith("| ✓ |")
    (tmp_path / "results.csv").unlink()
    text = published(tmp_path, rows, allow_dirty=True)
    assert (
        "aaaaaaa+dirty" in text and "unrecorded" in text and "Includes figures measured on modified" in text
    )
    assert goal_line(text, "accumulate fwd+bwd ≤ 1.10x plain").endswith("| ✗ |")  # 5.00x counts now


def test_step_goal_judged_on_the_interleaved_figure_only(tmp_path):
    rows = [
        step("plain", "median_ms", 65.5),
        step("memcore+inputs", "median_ms", 60.2),  # separate: -8.1 %
        step("memcore+inputs", "interleaved_ratio", 1.136),
        step("memcore+inputs", "interleaved_ratio_lo", 1.116),
        step("memcore+inputs", "interleaved_ratio_hi", 1.194),
        step("memcore", "interleaved_ratio", 0.986),
    ]
    text = published(tmp_path, rows)
    assert goal_line(text, "training step with accumulate(..., inputs=x)").endswith(
        "| +13.6 % | small_cnn 128x3x32x32 float32, 2026-01-02 | ✗ |"
    )
    assert goal_line(text, "training step with accumulate ≤ 1 %").endswith("| ✓ |")
    row = goal_line(text, "small_cnn")
    assert "-8.1 %" in row and "+13.6 % [+11.6, +19.4]" in row and "✓" not in row and "✗" not in row


def experiment(top_pc, extra=None):
    agree = {
        "CS top 400": 0.925,
        "PC top 400": top_pc,
        "CS all": 0.8,
        "PC all": 0.80,
        "SC all": 0.8,
        **(extra or {}),
    }
    return {
        "label": "mnist 4000, clean labels, K=128",
        "path": "results/x/results.json",
        "date": "2026-01-02",
        "command": "python -m memcore experiment",
        "config": {"model": "mlp", "train": dict(epochs=1, batch_size=2, lr=0.1, weight_decay=0)},
        "stability": {
            "k": 128,
            "stability_seconds": 500.0,
            "csl_seconds": 6.0,
            "tracked_seconds": 8.0,
            "agreement": {"csl": agree},
        },
    }


def test_cosine_on_a_constant_top_k_gets_no_verdict(tmp_path):
    text = published(tmp_path, ROWS, exps=[experiment(math.nan)])
    line = goal_line(text, "cosine(CSL, memorization) on the top-k")
    assert "n/a: the estimate is 1.0 on every top-k sample" in line and line.endswith("| — |")
    assert goal_line(text, "Pearson(CSL, memorization) on all").endswith("| 0.800 | 2026-01-02 | ✓ |")
    assert "| csl | 0.925 † |" in text
    assert "not measured: `python -m memcore experiment" in goal_line(text, "CSL ranks the most-memorized")
    text = render.render(render.load(tmp_path / "results.csv")[0], [experiment(0.5, {"SC top 400": 0.6})])
    assert goal_line(text, "cosine(CSL, memorization) on the top-k").endswith(
        "| 0.925 | top 400, 2026-01-02 | ✓ |"
    )
    assert goal_line(text, "CSL ranks the most-memorized").endswith(
        "| 0.600 | Spearman, top 400, 2026-01-02 | ✗ |"
    )


def test_pytest_benchmark_document_to_rows_and_git_state(tmp_path):
    doc = {
        "datetime": "2026-01-02T03:04:05+00:00",
        "machine_info": {"memcore": {"torch_version": "2.0", "cpu_model": "X", "cpu_count": 4}},
        "benchmarks": [
            {
                "name": "t",
                "stats": {"median": 0.002, "iqr": 0.0, "rounds": 7},
                "extra_info": {
                    "kernel": "cross_entropy",
                    "variant": "memcore",
                    "shape": "8x4",
                    "dtype": "float32",
                    "device": "cpu",
                    "threads": 1,
                },
            },
            {"name": "no kernel: not stored", "stats": {"median": 1.0}, "extra_info": {}},
        ],
    }
    rows = store.rows_from_pytest(doc, "c" * 40, "1")
    assert [(r["metric"], float(r["value"])) for r in rows] == [
        ("median_ms", 2.0),
        ("iqr_ms", 0.0),
        ("rounds", 7),
    ]
    assert (
        rows[0]["machine"] == "X, 4 cores"
        and rows[0]["dirty"] == "1"
        and rows[0]["date"] == "2026-01-02T03:04:05Z"
    )
    doc["benchmarks"][0]["extra_info"]["kernel"] = "nope"
    with pytest.raises(ValueError, match="unknown kernel 'nope'"):
        store.rows_from_pytest(doc, "", "")
    git = lambda *a: subprocess.run(["git", "-C", str(tmp_path), *a], check=True, capture_output=True)  # noqa: E731
    git("init", "-q")
    (tmp_path / "f.txt").write_text("1")
    git("add", "f.txt")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "x")
    assert store.git_state(tmp_path)[1] == "0"
    (tmp_path / "f.txt").write_text("2")
    commit, dirty = store.git_state(tmp_path)
    assert len(commit) == 40 and dirty == "1"


def lin(shape, variant, ms, mib, **kw):
    base = dict(CLEAN, **kw, suite="linear_cross_entropy", case="fwd+bwd", variant=variant, shape=shape)
    return [
        store.row(**base, metric="median_ms", value=ms, unit="ms"),
        store.row(**base, metric="peak_mib", value=mib, unit="MiB"),
    ]


def test_linear_section_and_goals_per_issue_shape(tmp_path):
    rows = (
        lin("4096x1024x32000", "plain", 100.0, 1000.0)
        + lin("4096x1024x32000", "linear", 80.0, 200.0)
        + lin("2048x2048x128256", "plain", 100.0, 3000.0)
        + lin("2048x2048x128256", "linear", 120.0, 1200.0)
        + lin("256x64x1001", "plain", 1.0, 1.0)
        + lin("256x64x1001", "linear", 9.0, 9.0)
    )  # smoke shape: no verdict
    text = published(tmp_path, rows)
    assert goal_line(
        text,
        "linear_accumulate peak ≤ 25 % of plain F.linear + F.cross_entropy's, above the inputs "
        "(4096x1024x32000",
    ).endswith("| 20.0 % | 4096x1024x32000 float32, 2026-01-02 | ✓ |")
    assert "| 40.0 % | 2048x2048x128256 float32, 2026-01-02 | ✗ |" in text
    assert goal_line(
        text, "linear_accumulate fwd+bwd ≤ 1.15x plain F.linear + F.cross_entropy (4096"
    ).endswith("| 0.80x | 4096x1024x32000 float32, 2026-01-02 | ✓ |")
    assert "| 1.20x | 2048x2048x128256 float32, 2026-01-02 | ✗ |" in text
    assert "256x64x1001 float32, 2026" not in text  # the smoke shape is tabled, never judged
    # the section: one row per shape, time and peak ratios vs plain, the weight gradient's share of plain's peak
    assert (
        "| 2048x2048x128256 | float32 | cpu | 2 | 100 | 120 | 3000 | 1200 | 1.20 | 0.40 | 0.33 | 2026-01-02 |"
        in text
    )
    assert "not measured: `bash scripts/gpu_session.sh build bench`" in goal_line(
        text, "linear_accumulate peak ≤ 2 GiB"
    )
    (tmp_path / "results.csv").unlink()  # peaks alone (e.g. a run's figures left out as dirty): still tabled
    text = published(
        tmp_path, [r for r in lin("4096x1024x32000", "linear", 80.0, 200.0) if r["metric"] == "peak_mib"]
    )
    assert "| 4096x1024x32000 | float32 | cpu | 2 | — | 200 | — | — | — | 2026-01-02 | aaaaaaa |" in text


def shard_rows(ratio):
    base = dict(CLEAN, suite="shard")
    return [
        store.row(**base, case="state", variant="dense", shape=100000, metric="bytes_per_sample", value=60.0),
        store.row(
            **base,
            case="state",
            variant="format 1 (memcore 0.1.0)",
            shape="",
            metric="bytes_per_sample",
            value=153.0,
        ),
        store.row(
            **base, case="scale", variant="2 gloo ranks", shape=100_000_000, metric="end_epoch_s", value=30
        ),
        store.row(
            **base,
            case="scale",
            variant="2 gloo ranks",
            shape=100_000_000,
            metric="end_epoch_s_min",
            value=29,
        ),
        store.row(
            **base,
            case="step, 2 gloo ranks",
            variant="sharded",
            shape="small_cnn 128x1x28x28",
            metric="interleaved_ratio",
            value=ratio,
        ),
    ]


def test_shard_goals_state_bytes_and_routing_judged_as_printed(tmp_path):
    text = published(tmp_path, shard_rows(1.048))
    assert goal_line(text, "tracker state ≤ 64 bytes per sample").endswith(
        "| 60.0 B | 100,000 samples, 2026-01-02 | ✓ |"
    )
    line = goal_line(text, "sharded routing ≤ 1 % of a training step")
    assert "| +4.8 % |" in line and "no confidence interval" in line and line.endswith("| ✗ |")
    assert "| format 1 (memcore 0.1.0) | — | 153.0 |" in text and "| 29.0–30.0 |" in text
    (tmp_path / "results.csv").unlink()
    line = goal_line(published(tmp_path, shard_rows(1.004)), "sharded routing ≤ 1 %")
    assert line.endswith(
        "(small_cnn 128x1x28x28, step, 2 gloo ranks) | #17 | cpu (Test CPU, 8 cores) | +0.4 % | "
        "no confidence interval: see the section, 2026-01-02 | ✓ |"
    )


def test_sass_goals_read_static_rows_per_arch(tmp_path):
    def sass(arch, case, dtype, metric, value):
        return store.row(
            **dict(CLEAN, device=f"sm_{arch}", dtype=dtype),
            suite="sass",
            case=case,
            variant=f"{dtype}, 512, 8",
            metric=metric,
            value=value,
        )

    rows = [
        sass(90, "forward", "bfloat16", "instr_per_elem", 5.8),
        sass(80, "forward", "bfloat16", "instr_per_elem", 12.0),
        sass(90, "forward", "float32", "instr_per_elem", 30.0),  # not a bf16 element: not judged
        sass(90, "forward", "bfloat16", "spill_bytes", 0),
        sass(80, "backward", "float32", "spill_bytes", 0),
    ]
    text = published(tmp_path, rows)
    assert goal_line(text, "forward main loop ≤ 10 SASS").endswith(
        "| 12.0 worst (5.8–12.0) | sm_80, 2026-01-02; sm_90, 2026-01-02 | ✗ |"
    )
    assert "not measured: `python -m benchmarks.sass_report`" in goal_line(
        text, "backward main loop ≤ 10 SASS"
    )
    assert (
        "| 0 B worst (0 B–0 B) |" in goal_line(text, "no register spills") and text.count("SASS, static") == 2
    )
    rows.append(sass(90, "commit", "float32", "spill_bytes", 16))
    (tmp_path / "results.csv").unlink()
    text = published(tmp_path, rows)
    assert goal_line(text, "no register spills").endswith("| ✗ |")
    assert (
        "| sm_90 | commit | float32, 512, 8 | float32 | — | 16.0 |" in text
    )  # the section: a row per instance


def test_linear_benchmark_document_to_rows():
    doc = {
        "datetime": "2026-01-02T03:04:05+00:00",
        "benchmarks": [
            {
                "name": "t",
                "stats": {"median": 2.0, "rounds": 1},
                "extra_info": {
                    "kernel": "linear_cross_entropy",
                    "variant": "linear",
                    "shape": "8x4x16",
                    "dtype": "float32",
                    "device": "cpu",
                    "threads": 1,
                    "peak_mib": 1.5,
                },
            }
        ],
    }
    rows = store.rows_from_pytest(doc, "c" * 40, "0")
    assert {(r["suite"], r["case"], r["metric"], float(r["value"])) for r in rows} >= {
        ("linear_cross_entropy", "fwd+bwd", "median_ms", 2000.0),
        ("linear_cross_entropy", "fwd+bwd", "peak_mib", 1.5),
    }


def _sass_row(family, dtype="bf16", instr=6.0, spill=0, arch="90", kernel=None):
    from benchmarks import sass_report

    return sass_report.Row(
        arch=arch,
        source="cross_entropy.cu",
        kernel=kernel or f"{family.split()[0]}_kernel<{dtype}, 512, 8>",
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
    main loop over 10 instructions per element, or a checked family absent from the build fails."""
    from benchmarks import sass_report

    clean = [_sass_row(f) for f in sass_report.CHECKED] + [_sass_row("forward", dtype="fp64", instr=44.0)]
    assert sass_report.check(clean) == []
    spill = clean + [_sass_row("commit", dtype="fp64", spill=16)]
    assert any("spill" in p for p in sass_report.check(spill))
    slow = [r if r.family != "backward" else _sass_row("backward", instr=10.5) for r in clean]
    assert any("backward bf16: 10.5" in p for p in sass_report.check(slow))
    gone = [r for r in clean if r.family != "forward (split)"]
    assert any("forward (split)" in p for p in sass_report.check(gone))
