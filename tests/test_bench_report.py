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
    assert small[9] == "7 / 7 / 7"

    mid = rows[("4096 x 1000", "cpu")]
    assert mid[4:7] == ["8.00", "12.0", "10.0"]
    assert mid[7] == "1.25 ✗" and mid[8] == "1.20 ✗"
    # order: smaller problem first
    assert section.index("| 512 x 10 ") < section.index("| 4096 x 1000 ")


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
