"""benchmarks/report.py on hand-made pytest-benchmark JSON: table contents, ratios, markers."""
import importlib.util
import json
from pathlib import Path

import pytest

REPORT = Path(__file__).resolve().parents[1] / "benchmarks" / "report.py"


@pytest.fixture(scope="module")
def report():
    spec = importlib.util.spec_from_file_location("memcore_bench_report", REPORT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def bench(variant, n, c, median_s, *, device="cpu", dtype="float32", threads=2, rounds=7, gpu=None):
    return {
        "group": f"cross_entropy {n}x{c} {dtype} {device}",
        "name": f"test_cross_entropy[{device}-{n}x{c}-{dtype}-{variant}]",
        "extra_info": {"kernel": "cross_entropy", "variant": variant, "shape": f"{n}x{c}", "n": n, "c": c,
                       "dtype": dtype, "device": device, "threads": threads, "gpu": gpu},
        "stats": {"median": median_s, "iqr": 0.0, "rounds": rounds, "mean": median_s, "min": median_s},
    }


def doc(benchmarks, when="2025-03-04T05:06:07.123456+00:00", torch_version="2.9.9"):
    return {
        "machine_info": {
            "node": "box", "system": "Linux", "release": "6.1", "machine": "x86_64",
            "memcore": {"platform": "Linux-6.1-x86_64", "cpu_model": "Test CPU 9000", "cpu_count": 8,
                        "torch_version": torch_version},
        },
        "datetime": when,
        "version": "5.3.1",
        "benchmarks": benchmarks,
    }


def write(tmp_path, name, content):
    path = tmp_path / name
    path.write_text(json.dumps(content))
    return path


def table_rows(section):
    """{shape cell: [cells]} of the Markdown table in a rendered section."""
    rows = {}
    for line in section.splitlines():
        if line.startswith("| ") and not line.startswith("| shape"):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            rows[(cells[0], cells[2])] = cells
    return rows


OVERWRITE = [bench("memcore_overwrite", 512, 10, 0.000150)]  # 0.75x plain

SMALL = [  # 512x10: accumulate/plain = 1.05 (meets 1.10), eager/accumulate = 2.00 (meets 1.5)
    bench("plain", 512, 10, 0.000200),
    bench("eager", 512, 10, 0.000420),
    bench("memcore", 512, 10, 0.000210),
]
MID = [  # 4096x1000: accumulate/plain = 1.25 (misses), eager/accumulate = 1.20 (misses)
    bench("plain", 4096, 1000, 0.0080, rounds=5),
    bench("eager", 4096, 1000, 0.0120, rounds=5),
    bench("memcore", 4096, 1000, 0.0100, rounds=5),
]


def test_ratios_and_cells(report, tmp_path):
    docs = report.load([write(tmp_path, "quick.json", doc(SMALL + MID))])
    section = report.render_section(docs)
    rows = table_rows(section)
    assert set(rows) == {("512 x 10", "cpu"), ("4096 x 1000", "cpu")}

    small = rows[("512 x 10", "cpu")]
    assert small[:4] == ["512 x 10", "float32", "cpu", "2"]
    assert small[4:7] == ["0.200", "0.420", "0.210"]          # medians in ms
    assert small[7] == "1.05 ✓" and small[8] == "2.00 ✓"
    assert small[9] == small[10] == report.MISSING          # no overwrite_logits run
    assert small[11] == "7 / 7 / 7"

    mid = rows[("4096 x 1000", "cpu")]
    assert mid[4:7] == ["8.00", "12.0", "10.0"]
    assert mid[7] == "1.25 ✗" and mid[8] == "1.20 ✗"
    # order: smaller problem first
    assert section.index("| 512 x 10 ") < section.index("| 4096 x 1000 ")


def test_overwrite_columns(report, tmp_path):
    docs = report.load([write(tmp_path, "o.json", doc(SMALL + OVERWRITE))])
    small = table_rows(report.render_section(docs))[("512 x 10", "cpu")]
    assert small[9] == "0.150" and small[10] == "0.75"
    assert small[4:7] == ["0.200", "0.420", "0.210"]


def test_ratio_function(report):
    rows = report.collect([doc(MID)])
    overhead, speedup = report.ratios(rows[(4096, 1000, "float32", "cpu", 2)])
    assert overhead == pytest.approx(10.0 / 8.0)
    assert speedup == pytest.approx(12.0 / 10.0)
    # goal boundaries: exactly 1.10 overhead and 1.5 speedup pass, as printed
    assert report.fmt_ratio(0.011 / 0.010, 1.10, higher_is_better=False) == "1.10 ✓"
    assert report.fmt_ratio(1.111, 1.10, higher_is_better=False) == "1.11 ✗"
    assert report.fmt_ratio(1.5, 1.5, higher_is_better=True) == "1.50 ✓"
    assert report.fmt_ratio(None, 1.5, higher_is_better=True) == report.MISSING


def test_gpu_goal_and_missing_variant(report):
    docs = [doc([
        bench("plain", 8192, 32000, 0.0020, device="cuda", dtype="bfloat16", threads=None, gpu="H100"),
        bench("eager", 8192, 32000, 0.0036, device="cuda", dtype="bfloat16", threads=None, gpu="H100"),
        bench("memcore", 8192, 32000, 0.0020, device="cuda", dtype="bfloat16", threads=None, gpu="H100"),
        bench("plain", 512, 10, 0.0002),
        bench("memcore", 512, 10, 0.0002),
    ])]
    section = report.render_section(docs)
    rows = table_rows(section)
    gpu = rows[("8192 x 32000", "cuda")]
    assert gpu[1] == "bfloat16" and gpu[3] == report.MISSING
    assert gpu[7] == "1.00 ✓"
    assert gpu[8] == "1.80 ✗"  # would pass the CPU goal (1.5), misses the GPU goal (2)
    cpu = rows[("512 x 10", "cpu")]
    assert cpu[5] == report.MISSING and cpu[8] == report.MISSING and cpu[7] == "1.00 ✓"
    assert "cuda (H100)" in section
    assert section.index("| 512 x 10 ") < section.index("| 8192 x 32000 ")  # cpu before cuda


def copy_bench(median_s, *, n=8192, c=32000, gpu="H100"):
    return {"group": "d2d copy", "name": "test_copy_bandwidth",
            "extra_info": {"kernel": "d2d_copy", "variant": "copy", "shape": f"{n}x{c}", "n": n, "c": c,
                           "dtype": "bfloat16", "device": "cuda", "bytes_moved": 2 * n * c * 2, "gpu": gpu},
            "stats": {"median": median_s, "iqr": 0.0, "rounds": 9, "mean": median_s, "min": median_s}}


def test_gpu_liger_and_bandwidth_table(report):
    cuda = dict(device="cuda", dtype="bfloat16", threads=None, gpu="H100")
    docs = [doc([
        bench("plain", 8192, 32000, 0.00070, **cuda),
        bench("memcore", 8192, 32000, 0.00060, **cuda),   # 3 x 8192 x 32000 x 2 B / 0.6 ms = 2621 GB/s
        bench("memcore_overwrite", 8192, 32000, 0.00040, **cuda),  # 2 x ... / 0.4 ms = 2621 GB/s
        bench("liger", 8192, 32000, 0.00050, **cuda),     # 0.60 / 0.50 = 1.20, 0.40 / 0.50 = 0.80
        bench("memcore", 4096, 1000, 0.00010, **cuda),    # 246 GB/s; no liger row
        bench("memcore", 512, 10, 0.0002),                # cpu: not in the GPU table
        copy_bench(0.00034),                              # 1048576000 B / 0.34 ms = 3084 GB/s
    ])]
    section = report.render_section(docs)
    rows = table_rows(section)
    big = rows[("8192 x 32000", "H100")]
    assert big[3:] == ["0.600", "0.400", "0.500", "1.20 ✗", "0.80 ✓", "85% ✓", "85% ✓", "3084"]
    mid = rows[("4096 x 1000", "H100")]
    assert mid[4] == mid[5] == mid[6] == mid[7] == report.MISSING
    assert mid[8] == "8%"                                  # no verdict below the largest shape
    assert ("512 x 10", "H100") not in rows and ("512 x 10", "cpu") in rows
    # the main table ignores the in-place variants and the copy
    assert rows[("8192 x 32000", "cuda")][4:7] == ["0.700", report.MISSING, "0.600"]
    assert report.GPU_NOTE not in section


def test_gpu_bandwidth_misses_goal_and_no_gpu_table_on_cpu(report):
    cuda = dict(device="cuda", dtype="bfloat16", threads=None, gpu="H100")
    docs = [doc([bench("memcore", 8192, 32000, 0.00100, **cuda), bench("liger", 8192, 32000, 0.00090, **cuda),
                 copy_bench(0.00035)])]
    big = table_rows(report.render_section(docs))[("8192 x 32000", "H100")]
    assert big[6] == "1.11 ✗" and big[8] == "52% ✗"       # 1573 GB/s of 2996
    assert big[4] == big[7] == big[9] == report.MISSING    # no overwrite run
    cpu_only = report.render_section([doc(SMALL)])
    assert "GPU: against liger-kernel" not in cpu_only


def test_header_lines(report):
    section = report.render_section([doc(SMALL)])
    assert "- Machine: Linux-6.1-x86_64, Test CPU 9000, 8 cores" in section
    assert "- torch: 2.9.9" in section
    assert "- Date: 2025-03-04 05:06 UTC" in section
    assert "- Device: cpu; torch CPU threads: 2" in section
    assert section.startswith(report.BEGIN) and section.endswith(report.END)
    assert "- Note:" not in section
    noted = report.render_section([doc(SMALL)], notes=["machine busy"])
    assert "- Source: ?\n- Note: machine busy\n" in noted


def test_later_file_wins_and_merges(report, tmp_path):
    quick = write(tmp_path, "quick.json", doc(SMALL + MID))
    full = write(tmp_path, "full.json", doc(
        [bench("plain", 512, 10, 0.000100), bench("eager", 8192, 32000, 3.0, rounds=2),
         bench("plain", 8192, 32000, 1.0, rounds=2), bench("memcore", 8192, 32000, 1.5, rounds=2)],
        when="2025-03-05T00:00:00+00:00"))
    section = report.render_section(report.load([quick, full]))
    rows = table_rows(section)
    assert rows[("512 x 10", "cpu")][4] == "0.100"          # overridden by the later file
    assert rows[("512 x 10", "cpu")][7] == "2.10 ✗"
    big = rows[("8192 x 32000", "cpu")]
    assert big[4:7] == ["1000", "3000", "1500"] and big[7] == "1.50 ✗" and big[8] == "2.00 ✓"
    assert "2025-03-04 05:06 UTC; 2025-03-05 00:00 UTC" in section
    assert "quick.json, full.json" in section


def test_results_file_created_and_section_replaced(report, tmp_path):
    out = tmp_path / "RESULTS.md"
    first = write(tmp_path, "a.json", doc(SMALL))
    second = write(tmp_path, "b.json", doc(MID))

    assert report.main([str(first), "-o", str(out)]) == 0
    text = out.read_text()
    assert text.startswith("# memcore benchmark results")
    assert text.count(report.BEGIN) == 1 and text.count(report.END) == 1
    assert "| 512 x 10 " in text

    # hand-written content around the section survives an update
    out.write_text("intro line\n\n" + text + "\n## Other section\n\nkeep me\n")
    assert report.main([str(second), "-o", str(out)]) == 0
    text = out.read_text()
    assert text.count(report.BEGIN) == 1 and text.count(report.END) == 1
    assert "| 4096 x 1000 " in text and "| 512 x 10 " not in text  # replaced, not appended
    assert text.startswith("intro line\n")
    assert text.rstrip().endswith("keep me")

    # idempotent: the same input twice gives the same file
    report.main([str(second), "-o", str(out)])
    assert out.read_text() == text


def test_section_appended_to_existing_file(report, tmp_path):
    out = tmp_path / "RESULTS.md"
    out.write_text("# results\n\n<!-- BEGIN other -->\nx\n<!-- END other -->\n")
    report.update_results(out, report.render_section([doc(SMALL)]))
    text = out.read_text()
    assert text.startswith("# results\n\n<!-- BEGIN other -->\nx\n<!-- END other -->\n\n" + report.BEGIN)
    assert text.count(report.BEGIN) == 1


@pytest.mark.parametrize("bad", [
    "<!-- BEGIN cross_entropy -->\nno end\n",
    "<!-- END cross_entropy -->\n",
    "<!-- BEGIN cross_entropy -->\n<!-- END cross_entropy -->\n<!-- BEGIN cross_entropy -->\n<!-- END cross_entropy -->\n",
])
def test_broken_markers_rejected(report, bad):
    with pytest.raises(ValueError):
        report.replace_section(bad, report.render_section([doc(SMALL)]))


def test_ignores_other_benchmarks(report):
    other = {"name": "test_other", "extra_info": {}, "stats": {"median": 1.0, "rounds": 1}}
    foreign = bench("plain", 64, 64, 0.001)
    foreign["extra_info"]["kernel"] = "grad_norm"
    rows = report.collect([doc(SMALL + [other, foreign])])
    assert list(rows) == [(512, 10, "float32", "cpu", 2)]


# ------------------------------------------------------------------------------------ training_step
def step_bench(model, shape, variant, median_s, *, device="cpu", dtype="float32", threads=1, rounds=9,
               batch=128, gpu=None, overhead=None):
    info = {"kernel": "training_step", "model": model, "variant": variant, "shape": shape, "batch": batch,
            "dtype": dtype, "device": device, "threads": threads, "gpu": gpu}
    if overhead is not None:
        info["overhead"] = overhead
        info["interleaved"] = {}
    return {
        "group": f"training_step {model} {shape} {dtype} {device}",
        "name": f"test_training_step[{model}-{device}-{shape}-{dtype}-{variant}]",
        "extra_info": info,
        "stats": {"median": median_s, "iqr": 0.0, "rounds": rounds, "mean": median_s, "min": median_s},
    }


CNN = "128x3x32x32"
STEPS = [  # small_cnn: memcore +0.4 % (meets 1 %), +inputs +6.0 % (misses 5 %)
    step_bench("small_cnn", CNN, "plain", 0.100),
    step_bench("small_cnn", CNN, "memcore", 0.1004),
    step_bench("small_cnn", CNN, "memcore+inputs", 0.106),
    step_bench("small_cnn", CNN, "interleaved", 0.31, rounds=40, overhead={
        "memcore": {"ratio": 1.012, "lo": 0.99, "hi": 1.03, "n": 40},           # +1.2 % misses 1 %
        "memcore+inputs": {"ratio": 1.04, "lo": 1.02, "hi": 1.055, "n": 40},    # +4.0 % meets 5 %
        "plain+xgrad": {"ratio": 1.031, "lo": 1.0, "hi": 1.05, "n": 40}}),      # no goal
    # LM: memcore 25 % faster than plain; no inputs variant
    step_bench("lm", "8x256 V=32000", "plain", 2.0, batch=8, rounds=3),
    step_bench("lm", "8x256 V=32000", "memcore", 1.5, batch=8, rounds=3),
]


def step_rows(section):
    """{(model, device): [cells]} of the training_step table."""
    rows = {}
    for line in section.splitlines():
        if line.startswith("| ") and not line.startswith("| model"):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            rows[(cells[0], cells[3])] = cells
    return rows


def test_training_section_numbers(report):
    section = report.render_training_section([doc(STEPS)])
    assert section.startswith("<!-- BEGIN training_step -->") and section.endswith("<!-- END training_step -->")
    rows = step_rows(section)
    assert set(rows) == {("small_cnn", "cpu"), ("lm", "cpu")}
    cnn = rows[("small_cnn", "cpu")]
    assert cnn[:5] == ["small_cnn", CNN, "float32", "cpu", "1"]
    assert cnn[5:7] == ["100", "100"]  # fmt_ms shows >= 100 ms as integers
    assert cnn[7] == "+0.4 % ✓"
    assert cnn[8] == "106" and cnn[9] == "+6.0 % ✗"
    assert cnn[10] == "+1.2 % [-1.0, +3.0] ✗"
    assert cnn[11] == "+4.0 % [+2.0, +5.5] ✓"
    assert cnn[12] == "+3.1 % [+0.0, +5.0]"
    assert cnn[13] == report.MISSING
    assert cnn[14] == "9 / 9 / 9 / 40"
    lm = rows[("lm", "cpu")]
    assert lm[1] == "8x256 V=32000"
    assert lm[5:8] == ["2000", "1500", "-25.0 % ✓"]
    assert lm[8] == lm[9] == lm[10] == lm[11] == lm[12] == report.MISSING
    assert lm[14] == "3 / 3 / — / —"
    assert section.index("| small_cnn ") < section.index("| lm ")
    assert "- Device: cpu; torch CPU threads: 1" in section
    assert report.GPU_NOTE in section


def test_training_overwrite_column(report):
    lm = STEPS[-2:] + [step_bench("lm", "8x256 V=32000", "interleaved", 5.0, batch=8, rounds=20, overhead={
        "memcore": {"ratio": 0.95, "lo": 0.93, "hi": 0.97, "n": 20},
        "memcore+overwrite": {"ratio": 0.80, "lo": 0.78, "hi": 0.83, "n": 20}})]
    row = step_rows(report.render_training_section([doc(lm)]))[("lm", "cpu")]
    assert row[10] == "-5.0 % [-7.0, -3.0] ✓"
    assert row[13] == "-20.0 % [-22.0, -17.0] ✓"
    assert row[14] == "3 / 3 / — / 20"


def test_training_goal_boundaries(report):
    assert report.fmt_pct(1.0, 1.0) == "+1.0 % ✓"
    assert report.fmt_pct(1.04, 1.0) == "+1.0 % ✓"       # verdict on the value as printed
    assert report.fmt_pct(1.06, 1.0) == "+1.1 % ✗"
    assert report.fmt_pct(-0.01, 1.0) == "+0.0 % ✓"       # no "-0.0"
    assert report.fmt_pct(5.0, 5.0) == "+5.0 % ✓"
    assert report.fmt_pct(None, 5.0) == report.MISSING
    assert report.overhead_pct({"plain": {"median_ms": 10.0}, "memcore": {"median_ms": 10.3}}, "memcore") \
        == pytest.approx(3.0)
    assert report.overhead_pct({"memcore": {"median_ms": 1.0}}, "memcore") is None


def test_training_gpu_rows(report):
    gpu = [step_bench("resnet18", "256x3x32x32", v, t, device="cuda", dtype="bfloat16", threads=None,
                      batch=256, gpu="H100") for v, t in (("plain", 0.050), ("memcore", 0.0502),
                                                          ("memcore+inputs", 0.0540))]
    section = report.render_training_section([doc(STEPS + gpu)])
    rows = step_rows(section)
    r18 = rows[("resnet18", "cuda")]
    assert r18[2] == "bfloat16" and r18[4] == report.MISSING
    assert r18[5:10] == ["50.0", "50.2", "+0.4 % ✓", "54.0", "+8.0 % ✗"]
    assert report.GPU_NOTE not in section and "GPU: not measured" not in section
    assert "cuda (H100)" in section
    assert section.index("| lm ") < section.index("| resnet18 ")  # cpu rows before cuda rows


# ------------------------------------------------------------------------------------ scaling
def scale_bench(variant, n, c, median_s, sweeps, *, device="cpu", dtype="float32", threads=1, peak=None, gpu=None):
    return {
        "group": f"scaling {device} {dtype}",
        "name": f"test_loss_scaling[{device}-{n}x{c}-{dtype}-{variant}]",
        "extra_info": {"kernel": "scaling", "variant": variant, "shape": f"{n}x{c}", "n": n, "c": c, "dtype": dtype,
                       "device": device, "sweeps": sweeps, "threads": threads, "peak_mem_mb": peak, "gpu": gpu},
        "stats": {"median": median_s, "iqr": 0.0, "rounds": 11, "mean": median_s, "min": median_s},
    }


def tracker_bench(num_samples, median_s, rounds=20, **mem):
    return {
        "group": "scaling tracker cpu", "name": f"test_tracker_scaling[cpu-{num_samples}]",
        "extra_info": {"kernel": "tracker_scaling", "variant": "memcore", "num_samples": num_samples,
                       "device": "cpu", "dtype": "float64", "threads": 1, **mem},
        "stats": {"median": median_s, "iqr": 0.0, "rounds": rounds, "mean": median_s, "min": median_s},
    }


SCALING = [
    scale_bench("plain", 1024, 10, 0.0002, ["C"]),
    scale_bench("eager", 1024, 10, 0.0006, ["C"]),
    scale_bench("memcore", 1024, 10, 0.0002, ["C"]),
    scale_bench("plain", 1024, 1000, 0.003, ["C", "N"]),
    scale_bench("eager", 1024, 1000, 0.008, ["C", "N"]),
    scale_bench("memcore", 1024, 1000, 0.004, ["C", "N"]),
    scale_bench("memcore", 4096, 1000, 0.016, ["N"]),
    scale_bench("eager", 4096, 1000, 0.032, ["N"]),
    tracker_bench(10_000, 0.001),
    tracker_bench(1_000_000, 0.120, rounds=4),
]


def tables(section):
    """[[row cells, ...], ...]: the Markdown tables of a section, in order, without header rows."""
    out, cur = [], None
    for line in section.splitlines():
        if line.startswith("|"):
            if cur is None:
                cur = []
                out.append(cur)
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            cur.append(cells)
        else:
            cur = None
    return [t[2:] for t in out]  # drop header and alignment rows


def test_scaling_section_tables(report):
    section = report.render_scaling_section([doc(SCALING)])
    assert section.startswith("<!-- BEGIN scaling -->") and section.endswith("<!-- END scaling -->")
    by_c, by_n, trk = tables(section)
    # vs C: both C-sweep shapes, ordered by C; columns plain / eager / memcore / eager÷memcore
    assert by_c == [["1024 x 10", "float32", "cpu", "1", "0.200", "0.600", "0.200", "3.00"],
                    ["1024 x 1000", "float32", "cpu", "1", "3.00", "8.00", "4.00", "2.00"]]
    # vs N: ordered by N; 4096 has no plain run
    assert by_n == [["1024 x 1000", "float32", "cpu", "1", "3.00", "8.00", "4.00", "2.00"],
                    ["4096 x 1000", "float32", "cpu", "1", "—", "32.0", "16.0", "2.00"]]
    assert trk == [["10,000", "cpu", "1", "1.00", "100", "20"], ["1,000,000", "cpu", "1", "120", "120", "4"]]
    assert "N fixed: 1024 (cpu)" in section and "C fixed: 1000" in section
    assert "[scaling.png](scaling.png)" in section
    assert report.GPU_NOTE in section
    assert "liger" not in section.split("\n\n")[3]  # no liger column without liger rows


def test_scaling_gpu_columns(report):
    gpu = [scale_bench(v, 8192, 32000, t, ["C"], device="cuda", dtype="bfloat16", threads=None, peak=m, gpu="H100")
           for v, t, m in (("plain", 0.004, 2500.0), ("eager", 0.010, 3000.4), ("memcore", 0.002, 500.0),
                           ("liger", 0.0025, 10.0))]
    section = report.render_scaling_section([doc(SCALING + gpu)])
    by_c = tables(section)[0]
    head = [line for line in section.splitlines() if line.startswith("| N x C")][0]
    assert "liger (ms)" in head and "memcore peak (MiB)" in head
    assert by_c[-1] == ["8192 x 32000", "bfloat16", "cuda", "—", "4.00", "10.0", "2.00", "2.50", "5.00",
                        "2500", "3000", "500", "10"]
    assert by_c[0][:4] == ["1024 x 10", "float32", "cpu", "1"] and by_c[0][7:] == ["—", "3.00", "—", "—", "—", "—"]
    assert report.GPU_NOTE not in section


def test_scaling_memory_columns(report):
    """CPU peaks (as benchmarks/memory.py records them) and the tracker's state size get columns;
    small figures keep two significant digits."""
    cpu = [scale_bench(v, 1024, 32000, t, ["C"], peak=m)
           for v, t, m in (("plain", 0.1, 375.0), ("memcore", 0.04, 125.03), ("memcore_overwrite", 0.01, 0.031))]
    trk = [tracker_bench(10_000, 0.001, state_mb=0.84, peak_mem_mb=1.5),
           tracker_bench(1_000_000, 0.1, rounds=4, state_mb=84.0, peak_mem_mb=None)]
    section = report.render_scaling_section([doc(cpu + trk)])
    by_c, rows = tables(section)  # no N sweep in the input: its table is a sentence
    assert by_c == [["1024 x 32000", "float32", "cpu", "1", "100", "40.0", "10.0", "375", "125", "0.031"]]
    head = [line for line in section.splitlines() if line.startswith("| num_samples")][0]
    assert "tracker state (MiB)" in head and "end_epoch() + scores() peak (MiB)" in head
    assert rows == [["10,000", "cpu", "1", "1.00", "100", "0.84", "1.5", "20"],
                    ["1,000,000", "cpu", "1", "100", "100", "84", "—", "4"]]


def test_main_writes_all_sections_once(report, tmp_path):
    out = tmp_path / "RESULTS.md"
    ce_json = write(tmp_path, "ce.json", doc(SMALL))
    step_json = write(tmp_path, "step.json", doc(STEPS))
    scale_json = write(tmp_path, "scale.json", doc(SCALING))
    assert report.main([str(ce_json), str(step_json), str(scale_json), "-o", str(out)]) == 0
    text = out.read_text()
    for name in ("cross_entropy", "training_step", "scaling"):
        assert text.count(f"<!-- BEGIN {name} -->") == 1 and text.count(f"<!-- END {name} -->") == 1
    assert text.index("BEGIN cross_entropy") < text.index("BEGIN training_step") < text.index("BEGIN scaling")
    assert (tmp_path / "scaling.png").stat().st_size > 0  # drawn next to the output
    # each section's header lists only the files that hold its benchmarks
    ce_part = text[text.index("BEGIN cross_entropy"):text.index("END cross_entropy")]
    assert "- Source: ce.json\n" in ce_part
    assert "- Source: step.json\n" in text and "- Source: scale.json\n" in text

    # a second run with new training figures replaces that section only, without duplicating markers
    faster = [step_bench("small_cnn", CNN, "plain", 0.050), step_bench("small_cnn", CNN, "memcore", 0.0502)]
    step2 = write(tmp_path, "step2.json", doc(faster))
    (tmp_path / "scaling.png").unlink()
    assert report.main([str(step2), "-o", str(out)]) == 0
    new = out.read_text()
    for name in ("cross_entropy", "training_step", "scaling"):
        assert new.count(f"<!-- BEGIN {name} -->") == 1 and new.count(f"<!-- END {name} -->") == 1
    rows = step_rows(new[new.index("BEGIN training_step"):new.index("END training_step")])
    assert rows[("small_cnn", "cpu")][5:8] == ["50.0", "50.2", "+0.4 % ✓"]
    assert ("lm", "cpu") not in rows
    assert new[:new.index("<!-- BEGIN training_step")] == text[:text.index("<!-- BEGIN training_step")]
    assert new[new.index("<!-- BEGIN scaling"):] == text[text.index("<!-- BEGIN scaling"):]
    assert not (tmp_path / "scaling.png").exists()  # nothing to plot in that input

    # idempotent, and --no-plot leaves the PNG alone
    report.main([str(ce_json), str(step_json), str(scale_json), "-o", str(out), "--no-plot"])
    report.main([str(ce_json), str(step_json), str(scale_json), "-o", str(out), "--no-plot"])
    assert out.read_text() == text
    assert not (tmp_path / "scaling.png").exists()


def test_empty_input_keeps_old_behaviour(report, tmp_path):
    out = tmp_path / "RESULTS.md"
    empty = write(tmp_path, "empty.json", doc([]))
    assert report.main([str(empty), "-o", str(out)]) == 0
    text = out.read_text()
    assert "_No cross_entropy benchmarks in the input._" in text
    assert "BEGIN training_step" not in text and "BEGIN scaling" not in text


def test_section_markers(report):
    assert report.section_markers(report.render_training_section([doc(STEPS)])) == (
        "<!-- BEGIN training_step -->", "<!-- END training_step -->")
    assert report.section_markers(report.render_section([doc(SMALL)])) == (report.BEGIN, report.END)
    bad = "<!-- BEGIN scaling -->\n<!-- END scaling -->\n<!-- BEGIN scaling -->\n<!-- END scaling -->\n"
    with pytest.raises(ValueError):
        report.replace_section(bad, report.render_scaling_section([doc(SCALING)]))


def test_plot_scaling_series(tmp_path):
    spec = importlib.util.spec_from_file_location("memcore_bench_plot", REPORT.parent / "plot_scaling.py")
    plot = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(plot)
    by_c, fixed = plot.series([doc(SCALING)], "C")
    assert by_c[("memcore", "cpu", "float32")] == {10: pytest.approx(0.2), 1000: pytest.approx(4.0)}
    assert fixed == {"cpu": 1024}
    by_n, fixed = plot.series([doc(SCALING)], "N")
    assert by_n[("eager", "cpu", "float32")] == {1024: pytest.approx(8.0), 4096: pytest.approx(32.0)}
    assert fixed == {"cpu": 1000}
    png = plot.plot([doc(SCALING)], tmp_path / "s.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert plot.main([str(write(tmp_path, "x.json", doc(SMALL))), "-o", str(tmp_path / "none.png")]) == 1


def test_notes_per_section(report):
    notes = ["machine shared", "training_step: interleaved is steadier", "scaling: full sizes", "odd: colon kept"]
    assert report.notes_for("training_step", notes) == ["machine shared", "interleaved is steadier", "odd: colon kept"]
    assert report.notes_for("cross_entropy", notes) == ["machine shared", "odd: colon kept"]
    sections = report.render_all([doc(SMALL + STEPS + SCALING)], notes=notes)
    assert [s.split("\n", 1)[0] for s in sections] == [
        "<!-- BEGIN cross_entropy -->", "<!-- BEGIN training_step -->", "<!-- BEGIN scaling -->"]
    assert "- Note: interleaved is steadier" in sections[1] and "steadier" not in sections[0] + sections[2]
    assert "- Note: full sizes" in sections[2] and all("- Note: machine shared" in s for s in sections)


def test_stability_report_section(tmp_path):
    import json
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
    import stability_report

    cfg = {"dataset": "mnist", "subset": 100, "stability_noise": 0.1, "model": "mlp",
           "train": {"epochs": 3, "batch_size": 128, "lr": 0.05, "weight_decay": 0.0}}
    res = {"command": "python -m memcore experiment --x", "config": cfg,
           "stability": {"k": 4, "plain_seconds": 1.9, "csl_seconds": 2.0, "tracked_seconds": 2.5,
                         "stability_seconds": 8.0, "train_accuracy": 0.99, "stability_p_in": 0.98,
                         "reliability": 0.81,
                         "agreement": {"csl": {"CS top 10": 0.9, "PC top 10": 0.5, "CS all": 0.4, "PC all": 0.8,
                                               "SC all": 0.7},
                                       "aum": {"CS top 10": 0.1, "PC top 10": 0.2, "CS all": 0.3, "PC all": 0.4,
                                               "SC all": 0.5}}}}
    src = tmp_path / "results.json"
    src.write_text(json.dumps(res))
    out = tmp_path / "RESULTS.md"
    stability_report.main([str(src), "-o", str(out)])
    stability_report.main([str(src), "-o", str(out)])
    text = out.read_text()
    assert text.count("<!-- BEGIN csl_vs_stability -->") == 1
    # ratios over the CSL run (2.0 s): 2,000 x 2 s / 2 s = 2,000x meets the 1,000x goal
    assert "| 4 | 1.9 | 2.0 | 2.5 | 8.0 | 2.00 | 4.0x | 2,000x ✓ | 4,000x ✓ |" in text
    assert "| csl | 0.900 ✓ | 0.500 | 0.400 | 0.800 ✓ | 0.700 |" in text
    assert "| aum | 0.100 | 0.200 | 0.300 | 0.400 | 0.500 |" in text  # verdicts are CSL's only
    assert "n/a" not in text
    assert "cosine, top 10 (goal ≥ 0.87)" in text and "Spearman, all" in text
    assert "√0.810 = 0.900" in text

    # a results file from before the plain / CSL timings: the run with every score stands in
    st = res["stability"]
    for key in ("plain_seconds", "csl_seconds", "train_accuracy", "stability_p_in", "reliability"):
        del st[key]
    st["stability_seconds"] = 1.0
    st["agreement"] = {"csl": {"CS top 10": 0.8, "PC top 10": 0.5, "CS all": 0.4, "PC all": 0.3}}
    src.write_text(json.dumps(res))
    stability_report.main([str(src), "-o", str(out)])
    text = out.read_text()
    assert "| 4 | 2.5 | 1.0 | 0.25 | 0.4x | 200x ✗ | 400x ✗ |" in text
    assert "| csl | 0.800 ✗ | 0.500 | 0.400 | 0.300 ✗ |" in text and "reliability" not in text

    # an undefined correlation (top-k memorization all 1.0) is n/a, explained, not "nan"
    st["agreement"]["csl"]["PC top 10"] = float("nan")
    src.write_text(json.dumps(res))
    stability_report.main([str(src), "-o", str(out)])
    text = out.read_text()
    assert "| csl | 0.800 ✗ | n/a | 0.400 | 0.300 ✗ |" in text and "n/a: a correlation is undefined" in text

    # several experiments (e.g. noisy and clean labels): one section, a subsection each, in order
    clean = json.loads(json.dumps(res))
    clean["config"]["stability_noise"] = 0.0
    src2 = tmp_path / "clean.json"
    src2.write_text(json.dumps(clean))
    stability_report.main([str(src), str(src2), "-o", str(out)])
    text = out.read_text()
    assert text.count("<!-- BEGIN csl_vs_stability -->") == 1 and text.count("Ratios are") == 1
    assert 0 < text.index("### 10% label noise, K=4") < text.index("### Clean labels, K=4")


def test_save_dir_prune_and_stored_notes(report, tmp_path):
    """--save keeps compact copies (no per-round data) with their notes; --dir merges them, oldest
    run first; --prune drops a saved run whose every case a later run repeats."""
    old = doc(SMALL, when="2025-01-01T00:00:00+00:00")
    for b in old["benchmarks"]:
        b["fullname"] = b["name"]
        b["stats"]["data"] = [b["stats"]["median"]] * 3
    first = write(tmp_path, "old.json", old)
    saved = tmp_path / "saved"
    assert report.main([str(first), "--save", str(saved), "--note", "cross_entropy: first run",
                        "-o", str(tmp_path / "R.md"), "--no-plot"]) == 0
    stored = json.loads((saved / "old.json").read_text())
    assert "data" not in stored["benchmarks"][0]["stats"]
    assert stored["memcore_notes"] == ["cross_entropy: first run"]

    # a later GPU-only run: rendering with --dir keeps the CPU rows and the first run's note
    gpu = doc([bench("memcore", 8192, 32000, 0.0006, device="cuda", dtype="bfloat16", threads=None, gpu="H100")],
              when="2025-02-01T00:00:00+00:00")
    second = write(tmp_path, "gpu.json", gpu)
    out = tmp_path / "R.md"
    assert report.main([str(second), "--dir", str(saved), "--save", str(saved), "-o", str(out), "--no-plot"]) == 0
    text = out.read_text()
    rows = table_rows(text)
    assert ("512 x 10", "cpu") in rows and ("8192 x 32000", "cuda") in rows
    assert "- Note: first run" in text
    assert sorted(p.name for p in saved.iterdir()) == ["gpu.json", "old.json"]

    # a later CPU run repeating every case of old.json: --prune removes old.json, the rows are the new ones
    newer = doc([dict(b, stats=dict(b["stats"], median=b["stats"]["median"] * 2)) for b in old["benchmarks"]],
                when="2025-03-01T00:00:00+00:00")
    third = write(tmp_path, "new.json", newer)
    assert report.main([str(third), "--dir", str(saved), "--save", str(saved), "--prune", "-o", str(out),
                        "--no-plot"]) == 0
    assert sorted(p.name for p in saved.iterdir()) == ["gpu.json", "new.json"]
    rows = table_rows(out.read_text())
    assert rows[("512 x 10", "cpu")][4] == "0.400" and ("8192 x 32000", "cuda") in rows
    assert "first run" not in out.read_text()


# ------------------------------------------------------------------------------------ summary
def _summary():
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
    import summary

    return summary


def _experiment(noise, cs_top, pc_all, k=100, stab_s=300.0, csl_s=4.0):
    return {"config": {"dataset": "mnist", "subset": 4000, "stability_noise": noise},
            "stability": {"k": k, "stability_seconds": stab_s, "csl_seconds": csl_s, "tracked_seconds": 5.0,
                          "agreement": {"csl": {"CS top 400": cs_top, "PC top 400": 0.1, "CS all": 0.5,
                                                "PC all": pc_all}}}}


def test_summary_rows_and_verdicts(tmp_path):
    summary = _summary()
    curv = {"cpu": {"device": "cpu", "speedup_best": 2.04, "speedup_median": 1.9, "spearman": 0.97}}
    experiments = [(_experiment(0.1, 0.9, 0.7), "a"), (_experiment(0.0, 0.8, 0.8, stab_s=150.0), "b")]
    section = summary.render([doc(SMALL + MID + STEPS)], curv, experiments)
    rows = {(r[0], r[2]): r[3:] for r in (line.strip("|").split(" | ") for line in section.splitlines()
                                           if line.startswith("| ") and not line.startswith("| goal"))}
    rows = {(g.strip(), d.strip()): [c.strip() for c in rest] for (g, d), rest in rows.items()}
    # cross-entropy: the worst shape decides (MID: 1.25x plain, 1.20x eager: both missed)
    assert rows[("accumulate fwd+bwd ≤ 1.10x plain F.cross_entropy, every shape", "cpu")][0].startswith("1.05x–1.25x")
    assert rows[("accumulate fwd+bwd ≤ 1.10x plain F.cross_entropy, every shape", "cpu")][1] == "✗"
    assert rows[("accumulate ≥ 1.5x faster than the eager statistics", "cpu")] == ["1.20x–2.00x", "✗"]
    # training step: the interleaved medians, with the goal of each variant
    assert rows[("training step with accumulate ≤ 1 % slower (small_cnn 128x3x32x32 float32)", "cpu")] == [
        "+1.2 % (interleaved median)", "✗"]
    assert rows[("training step with accumulate(..., inputs=x) ≤ 5 % slower (small_cnn 128x3x32x32 float32)",
                 "cpu")] == ["+4.0 % (interleaved median)", "✓"]
    assert rows[("curvature ≥ 2x faster than the reference algorithm (10 probes)", "cpu")][1] == "✓"
    # stability: ratio at K=2000 = 2000 x (300 / 100) / 4 = 1,500x; clean: 750x
    assert rows[("CSL ≥ 1,000x cheaper than stability at K=2000 (mnist 4000, 10% noise, K=100)", "cpu")] == [
        "1,500x", "✓"]
    assert rows[("CSL ≥ 1,000x cheaper than stability at K=2000 (mnist 4000, clean labels, K=100)", "cpu")] == [
        "750x", "✗"]
    assert rows[("cosine(CSL, memorization) on the top-k ≥ 0.87 (mnist 4000, 10% noise, K=100)", "cpu")] == [
        "0.900", "✓"]
    assert rows[("Pearson(CSL, memorization) on all ≥ 0.79 (mnist 4000, clean labels, K=100)", "cpu")] == [
        "0.800", "✓"]
    # no CUDA measurement: every GPU goal is listed as not measured, with its command, after the CPU rows
    gpu = [k for k in rows if k[1] == "cuda"]
    assert len(gpu) == 6 and all(rows[k][0].startswith("not measured: `bash scripts/gpu_session.sh")
                                 and rows[k][1] == "—" for k in gpu)
    assert section.index("| cpu |") < section.index("| cuda |")
    assert "6 met, 6 missed, 6 not measured" in section  # counted from the rows above


def test_summary_gpu_rows_when_measured():
    summary = _summary()
    big = [bench(v, 8192, 32000, t, device="cuda", dtype="bfloat16", threads=None, gpu="H100")
           for v, t in (("plain", 0.004), ("eager", 0.010), ("memcore", 0.0025), ("liger", 0.0026))]
    copy = {"group": "copy", "name": "test_cuda_copy_bandwidth",
            "extra_info": {"kernel": "d2d_copy", "gpu": "H100", "device": "cuda", "bytes_moved": 2 * 8192 * 32000 * 2},
            "stats": {"median": 0.0004, "iqr": 0.0, "rounds": 10, "mean": 0.0004, "min": 0.0004}}
    section = summary.render([doc(big + [copy])], {}, [])
    lines = [line for line in section.splitlines() if "| cuda |" in line]
    text = "\n".join(lines)
    assert "| 0.62x (8192x32000 bfloat16) | ✓ |" in text and "| 4.00x | ✓ |" in text
    assert "memcore / liger ≤ 1.00) | #3 | cuda | 0.96 | ✓ |" in text
    # 3 passes of 8192 x 32000 x 2 bytes in 2.5 ms = 629 GB/s against the copy's 2,621 GB/s: 24 %
    assert "| 24% (8192x32000 bfloat16) | ✗ |" in text
    assert sum("not measured" in line for line in lines) == 2  # the training step and curvature rows


def test_summary_placed_first_and_idempotent(tmp_path):
    summary = _summary()
    (tmp_path / "json").mkdir()
    (tmp_path / "json" / "run.json").write_text(json.dumps(doc(SMALL)))
    out = tmp_path / "RESULTS.md"
    out.write_text("# results\n\nintro\n\n<!-- BEGIN cross_entropy -->\nx\n<!-- END cross_entropy -->\n")
    argv = ["-o", str(out), "--json-dir", str(tmp_path / "json"), "--results-dir", str(tmp_path / "none")]
    summary.main(argv)
    first = out.read_text()
    assert first.index("intro") < first.index("<!-- BEGIN summary -->") < first.index("<!-- BEGIN cross_entropy")
    summary.main(argv)
    assert out.read_text() == first and first.count("<!-- BEGIN summary -->") == 1


def test_curvature_summary_file_feeds_the_summary(tmp_path):
    """test_bench_curvature.py --write saves the goals' figures where summary.py reads them."""
    summary = _summary()
    import test_bench_curvature as tbc

    r = {"wall": {"memcore": [0.2, 0.1, 0.3], "reference": [0.4, 0.3, 0.5], "memcore_max_rows_512": [1.0]},
         "rho": 0.96, "date": "2026-01-01 00:00 UTC", "rounds": 3}
    tbc.save_summary(r, str(tmp_path / "curvature"))
    curv = summary.load_curvature(tmp_path / "curvature")
    assert curv[tbc.DEVICE]["speedup_best"] == pytest.approx(3.0) and curv[tbc.DEVICE]["speedup_median"] == 2.0
    rows = summary.curvature_rows(curv)
    assert rows[0][2:] == (tbc.DEVICE, "3.00x best, 2.00x median", "✓")
    assert rows[1][3:] == ("0.960", "✓")
