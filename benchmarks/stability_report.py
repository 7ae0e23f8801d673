"""CSL vs the stability estimator: compute and agreement, from an experiment's results.json, into
the `csl_vs_stability` section of benchmarks/RESULTS.md.

    python -m memcore experiment --dataset mnist --subset 4000 --noise "" --stability-k 32 \\
        --stability-noise 0.1 --epochs 30 --weight-decay 0 --out results/mnist-memorization
    python benchmarks/stability_report.py results/mnist-memorization/results.json
"""
import argparse
import json
import os
import sys
from typing import List, Optional, Sequence

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from report import DEFAULT_OUTPUT, update_results  # noqa: E402

NAME = "csl_vs_stability"
PUBLISHED_K = (2000, 4000)  # models of the published Feldman-Zhang estimates


def render(results: dict, source: str) -> str:
    st = results["stability"]
    k, run_s, stab_s = st["k"], st["tracked_seconds"], st["stability_seconds"]
    per_model = stab_s / k
    cfg = results["config"]
    rows: List[str] = [
        f"<!-- BEGIN {NAME} -->",
        "## CSL vs the stability (Feldman–Zhang) estimator: compute and agreement",
        "",
        f"- Source: `{source}`, produced by `{results['command']}`",
        f"- Data: {cfg['dataset']} subset {cfg['subset']}, label noise {cfg['stability_noise']:.0%}; model "
        f"{cfg['model']}, {cfg['train']['epochs']} epochs; CPU (see the results file for machine and date)",
        "",
        "| K (models) | one tracked run (s) | stability, K models (s) | per model (s) | measured ratio | "
        + " | ".join(f"extrapolated ratio at K={p}" for p in PUBLISHED_K) + " |",
        "|---:|---:|---:|---:|---:|" + "---:|" * len(PUBLISHED_K),
        f"| {k} | {run_s:.1f} | {stab_s:.1f} | {per_model:.2f} | {stab_s / run_s:.1f}x | "
        + " | ".join(f"{p * per_model / run_s:,.0f}x" for p in PUBLISHED_K) + " |",
        "",
        "The extrapolation multiplies the measured time per stability model (each trained on 70% of the",
        "data for the same epochs) by the published K; the tracked run is a full training run with every",
        "memcore score recorded (input gradients included), so CSL itself costs nothing beyond it.",
        "",
        "| score | cosine, top-k by memorization | Pearson, top-k | cosine, all | Pearson, all |",
        "|---|---:|---:|---:|---:|",
    ]
    for key, vals in st["agreement"].items():
        v = list(vals.values())
        rows.append(f"| {key} | " + " | ".join(f"{x:.3f}" for x in v) + " |")
    rows.append(f"<!-- END {NAME} -->")
    return "\n".join(rows)


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("results", help="results.json written by `python -m memcore experiment`")
    ap.add_argument("-o", "--output", default=str(DEFAULT_OUTPUT))
    args = ap.parse_args(argv)
    with open(args.results) as f:
        results = json.load(f)
    if "stability" not in results:
        ap.error(f"{args.results} has no stability experiment (run with --stability-k)")
    section = render(results, os.path.relpath(args.results))
    update_results(args.output, section)
    print(section)
    return 0


if __name__ == "__main__":
    sys.exit(main())
