"""Goals at a glance: every benchmark goal of the issues in one table at the top of RESULTS.md —
the figure measured for it, on which device, and ✓ / ✗ — read from the same saved measurements
the sections below are made from (never typed):

    benchmarks/json/*.json              pytest-benchmark runs (cross-entropy, training step)
    benchmarks/json/curvature/*.json    benchmarks/test_bench_curvature.py --write, one per device
    results/*/results.json              `python -m memcore experiment ... --stability-k K`

A goal with no measurement on its device (the GPU rows, until a GPU run) is listed as not
measured, with the command that measures it.

    python benchmarks/summary.py            # rewrites the summary section of benchmarks/RESULTS.md
"""
import argparse
import json
import os
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import report  # noqa: E402
import stability_report  # noqa: E402
from stability_report import _ok  # noqa: E402

NAME = "summary"
CURVATURE_GOALS = {"cpu": 2.0, "cuda": 3.0}  # speedup over the reference algorithm at 10 probes
SPEARMAN_GOAL = 0.95
GPU_BENCH = "`bash scripts/gpu_session.sh build bench`"
GPU_CURV = "`bash scripts/gpu_session.sh build curvature`"

Row = Tuple[str, str, str, str, str]  # goal, issue, device, measured, verdict


def _span(values: Sequence[float], fmt: str) -> str:
    lo, hi = min(values), max(values)
    return fmt.format(lo) if round(lo, 2) == round(hi, 2) else f"{fmt.format(lo)}–{fmt.format(hi)}"


def _not_measured(goal: str, issue: str, command: str) -> Row:
    return goal, issue, "cuda", f"not measured: {command}", "—"


def cross_entropy_rows(docs: Sequence[dict]) -> List[Row]:
    rows = report.collect(docs)
    out: List[Row] = []
    for device in ("cpu", "cuda"):
        keys = sorted((k for k in rows if k[3] == device), key=report._sort_key)
        ratios = {k: report.ratios(rows[k]) for k in keys}  # (accumulate / plain, eager / accumulate)
        over = [(k, r[0]) for k, r in ratios.items() if r[0] is not None]
        speed = [(k, r[1]) for k, r in ratios.items() if r[1] is not None]
        shapes = lambda ks: ", ".join(f"{k[0]}x{k[1]} {k[2]}" for k in ks)  # noqa: E731
        goal_speed = report.GOAL_SPEEDUP[device]
        if over:
            worst = max(v for _, v in over)
            out.append((f"accumulate fwd+bwd ≤ {report.GOAL_OVERHEAD:.2f}x plain F.cross_entropy, every shape", "#3",
                        device, f"{_span([v for _, v in over], '{:.2f}x')} ({shapes([k for k, _ in over])})",
                        _ok(round(worst, 2) <= report.GOAL_OVERHEAD)))
        elif device == "cuda":
            out.append(_not_measured(f"accumulate fwd+bwd ≤ {report.GOAL_OVERHEAD:.2f}x plain F.cross_entropy",
                                     "#3", GPU_BENCH))
        if speed:
            worst = min(v for _, v in speed)
            out.append((f"accumulate ≥ {goal_speed:g}x faster than the eager statistics", "#3", device,
                        f"{_span([v for _, v in speed], '{:.2f}x')}", _ok(round(worst, 2) >= goal_speed)))
        elif device == "cuda":
            out.append(_not_measured(f"accumulate ≥ {goal_speed:g}x faster than the eager statistics", "#3",
                                     GPU_BENCH))
    cuda = [k for k in rows if k[3] == "cuda"]
    liger = [(rows[k]["memcore"]["median_ms"] / rows[k]["liger"]["median_ms"])
             for k in cuda if "memcore" in rows[k] and "liger" in rows[k]]
    goal = f"accumulate at least as fast as Liger's cross-entropy (memcore / liger ≤ {report.GOAL_VS_LIGER:.2f})"
    if liger:
        out.append((goal, "#3", "cuda", _span(liger, "{:.2f}"), _ok(round(max(liger), 2) <= report.GOAL_VS_LIGER)))
    else:
        out.append(_not_measured(goal, "#3", GPU_BENCH + " (liger-kernel from scripts/gpu_wheels.sh)"))
    copy = report.collect_copy(docs)
    goal = f"≥ {report.GOAL_BANDWIDTH_PCT:.0f}% of the D2D copy bandwidth on the largest shape"
    pct = None
    if cuda and copy:
        big = max(cuda, key=lambda k: k[0] * k[1])
        v = rows[big]
        gpu = next((x.get("gpu") for x in v.values() if x.get("gpu")), None) or big[3]
        eff = report.effective_gbs(big[0], big[1], big[2], v.get("memcore", {}).get("median_ms"), report.LOGITS_PASSES)
        if eff and copy.get(gpu):
            pct = 100.0 * eff / copy[gpu]
    if pct is not None:
        out.append((goal, "#3", "cuda", f"{pct:.0f}% ({big[0]}x{big[1]} {big[2]})",
                    _ok(round(pct) >= report.GOAL_BANDWIDTH_PCT)))
    else:
        out.append(_not_measured(goal, "#3", GPU_BENCH))
    return out


def training_rows(docs: Sequence[dict]) -> List[Row]:
    rows = report.collect_training(docs)
    out: List[Row] = []
    for key in sorted(rows, key=lambda k: report._train_sort_key(k, rows[k])):
        model, shape, dtype, device, _ = key
        inter = rows[key].get("interleaved", {}).get("overhead") or {}
        label = f"{model} {shape} {dtype}"
        for variant, goal in report.TRAIN_GOALS.items():
            entry = inter.get(variant)
            if not entry or entry.get("ratio") is None:
                continue
            pct = round(100.0 * (float(entry["ratio"]) - 1.0), 1) + 0.0
            what = "accumulate" if variant == "memcore" else "accumulate(..., inputs=x)"
            out.append((f"training step with {what} ≤ {goal:g} % slower ({label})", "#6", device,
                        f"{pct:+.1f} % (interleaved median)", _ok(pct <= goal)))
    if not any(k[3] == "cuda" for k in rows):
        out.append(_not_measured("training step ≤ 1 % slower (ResNet-18 bf16, LM bf16)", "#6", GPU_BENCH))
    return out


def load_curvature(folder: Path) -> Dict[str, dict]:
    """{device: the saved summary of test_bench_curvature.py --write}."""
    out = {}
    for path in sorted(folder.glob("*.json")):
        with open(path) as f:
            d = json.load(f)
        out[str(d["device"])] = d
    return out


def curvature_rows(curv: Dict[str, dict]) -> List[Row]:
    out: List[Row] = []
    for device in ("cpu", "cuda"):
        goal = CURVATURE_GOALS[device]
        text = f"curvature ≥ {goal:g}x faster than the reference algorithm (10 probes)"
        d = curv.get(device)
        if d is None:
            if device == "cuda":
                out.append(_not_measured(text, "#4", GPU_CURV))
            continue
        out.append((text, "#4", device, f"{d['speedup_best']:.2f}x best, {d['speedup_median']:.2f}x median",
                    _ok(d["speedup_best"] >= goal)))
        out.append((f"curvature ranks like the reference (Spearman ≥ {SPEARMAN_GOAL})", "#4", device,
                    f"{d['spearman']:.3f}", _ok(d["spearman"] >= SPEARMAN_GOAL)))
    return out


def load_experiments(folder: Path) -> List[Tuple[dict, str]]:
    """(results, path) of every experiment under ``folder`` that ran the stability estimator."""
    out = []
    for path in sorted(folder.glob("*/results.json")):
        with open(path) as f:
            d = json.load(f)
        if "stability" in d and "csl_seconds" in d["stability"]:  # the compute comparison's current form
            out.append((d, str(path)))
    return out


def stability_rows(experiments: Sequence[Tuple[dict, str]]) -> List[Row]:
    goals = stability_report.GOALS
    out: List[Row] = []
    for d, path in experiments:
        st, cfg = d["stability"], d["config"]
        noise = cfg.get("stability_noise") or 0.0
        label = f"{cfg['dataset']} {cfg['subset']}, {f'{noise:.0%} noise' if noise else 'clean labels'}, K={st['k']}"
        lo = min(stability_report.PUBLISHED_K) * st["stability_seconds"] / st["k"] / st["csl_seconds"]
        out.append((f"CSL ≥ {goals['ratio']:,.0f}x cheaper than stability at K={min(stability_report.PUBLISHED_K)} "
                    f"({label})", "#6", "cpu", f"{lo:,.0f}x", _ok(lo >= goals["ratio"])))
        csl = st["agreement"]["csl"]
        top = next(k for k in csl if k.startswith("CS top"))
        out.append((f"cosine(CSL, memorization) on the top-k ≥ {goals['cs_top']} ({label})", "#5/#6", "cpu",
                    f"{csl[top]:.3f}", _ok(csl[top] >= goals["cs_top"])))
        out.append((f"Pearson(CSL, memorization) on all ≥ {goals['pc_all']} ({label})", "#5/#6", "cpu",
                    f"{csl['PC all']:.3f}", _ok(csl["PC all"] >= goals["pc_all"])))
    return out


def render(docs: Sequence[dict], curv: Dict[str, dict], experiments: Sequence[Tuple[dict, str]]) -> str:
    rows = cross_entropy_rows(docs) + training_rows(docs) + curvature_rows(curv) + stability_rows(experiments)
    order = {"cpu": 0, "cuda": 1}
    rows = sorted(rows, key=lambda r: order.get(r[2], 9))  # stable: CPU goals first, then the GPU's
    met = sum(r[4] == "✓" for r in rows)
    missed = sum(r[4] == "✗" for r in rows)
    open_ = sum(r[4] == "—" for r in rows)
    lines = [
        f"<!-- BEGIN {NAME} -->",
        "## Goals at a glance",
        "",
        f"{met} met, {missed} missed, {open_} not measured. Each figure comes from the section below that "
        "holds its details (device, shapes, date); ✓ / ✗ is the verdict on the figure as printed.",
        "",
        "| goal | issue | device | measured | |",
        "|---|---|---|---|---|",
    ]
    lines += [f"| {g} | {i} | {dev} | {m} | {v} |" for g, i, dev, m, v in rows]
    lines.append(f"<!-- END {NAME} -->")
    return "\n".join(lines)


def place(text: str, section: str) -> str:
    """``text`` with the summary replaced, or inserted before the first section when absent."""
    if f"<!-- BEGIN {NAME} -->" in text:
        return report.replace_section(text, section)
    first = text.find("<!-- BEGIN ")
    if first < 0:
        return text.rstrip("\n") + "\n\n" + section + "\n"
    return text[:first] + section + "\n\n" + text[first:]


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-o", "--output", default=str(report.DEFAULT_OUTPUT))
    ap.add_argument("--json-dir", default=str(HERE / "json"), help="saved pytest-benchmark runs")
    ap.add_argument("--results-dir", default=str(HERE.parent / "results"), help="experiment results folders")
    args = ap.parse_args(argv)
    json_dir = Path(args.json_dir)
    docs = report.load_dir(json_dir) if json_dir.is_dir() else []
    curv = load_curvature(json_dir / "curvature") if (json_dir / "curvature").is_dir() else {}
    experiments = [(d, os.path.relpath(p)) for d, p in load_experiments(Path(args.results_dir))]
    section = render(docs, curv, experiments)
    out = Path(args.output)
    out.write_text(place(out.read_text() if out.exists() else report.FILE_HEADER, section))
    print(section)
    return 0


if __name__ == "__main__":
    sys.exit(main())
