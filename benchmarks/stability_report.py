"""CSL vs the stability estimator: compute and agreement, from an experiment's results.json, into
the `csl_vs_stability` section of benchmarks/RESULTS.md.

    python -m memcore experiment --dataset mnist --subset 4000 --noise "" --stability-k 128 \\
        --stability-noise 0.1 --epochs 60 --weight-decay 0 --out results/mnist-memorization
    python -m memcore experiment --dataset mnist --subset 4000 --noise "" --stability-k 128 \\
        --epochs 60 --weight-decay 0 --out results/mnist-memorization-clean
    python benchmarks/stability_report.py results/mnist-memorization/results.json \\
        results/mnist-memorization-clean/results.json
"""
import argparse
import json
import os
import sys
from typing import List, Optional, Sequence, Tuple

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from report import DEFAULT_OUTPUT, update_results  # noqa: E402

NAME = "csl_vs_stability"
PUBLISHED_K = (2000, 4000)  # models of the published Feldman-Zhang estimates


GOALS = {"ratio": 1000.0, "cs_top": 0.87, "pc_all": 0.79}  # issue 6 / the evaluation issue's CPU goals


def _ok(ok: bool) -> str:
    return "✓" if ok else "✗"


def _block(results: dict, source: str) -> List[str]:
    """One experiment's subsection: its compute and agreement tables."""
    st = results["stability"]
    k, stab_s = st["k"], st["stability_seconds"]
    per_model = stab_s / k
    cfg = results["config"]
    timed = [("plain F.cross_entropy run (s)", st.get("plain_seconds")), ("CSL run (s)", st.get("csl_seconds")),
             ("every score, input gradients too (s)", st["tracked_seconds"])]
    # older results files timed only the run with every score; it stands in for the CSL run
    csl_s = st.get("csl_seconds", st["tracked_seconds"])
    timed = [(name, v) for name, v in timed if v is not None]
    noise = cfg["stability_noise"]
    rows: List[str] = [
        f"### {f'{noise:.0%} label noise' if noise else 'Clean labels'}, K={k}",
        "",
        f"- Source: `{source}`, produced by `{results['command']}`",
        f"- Data: {cfg['dataset']} subset {cfg['subset']}, label noise {noise:.0%}; model "
        f"{cfg['model']}, {cfg['train']['epochs']} epochs, batch {cfg['train']['batch_size']}, lr "
        f"{cfg['train']['lr']}, weight decay {cfg['train']['weight_decay']}; CPU (see the results file for "
        "machine and date)",
        "",
        "| K (models) | " + " | ".join(name for name, _ in timed) + " | stability, K models (s) | per model (s) | "
        "measured ratio | " + " | ".join(f"ratio at K={p} (goal ≥ {GOALS['ratio']:,.0f}x)" for p in PUBLISHED_K) + " |",
        "|---:|" + "---:|" * len(timed) + "---:|---:|---:|" + "---:|" * len(PUBLISHED_K),
        f"| {k} | " + " | ".join(f"{v:.1f}" for _, v in timed) + f" | {stab_s:.1f} | {per_model:.2f} | "
        f"{stab_s / csl_s:.1f}x | "
        + " | ".join(f"{p * per_model / csl_s:,.0f}x {_ok(p * per_model / csl_s >= GOALS['ratio'])}"
                     for p in PUBLISHED_K) + " |",
        "",
    ]
    agreement = st["agreement"]
    cols = list(next(iter(agreement.values())).keys())
    names = {"CS": "cosine", "PC": "Pearson", "SC": "Spearman"}

    def head(c: str) -> str:
        kind, _, where = c.partition(" ")
        label = f"{names.get(kind, kind)}, {where}"
        if kind == "CS" and where.startswith("top"):
            label += f" (goal ≥ {GOALS['cs_top']})"
        if kind == "PC" and where == "all":
            label += f" (goal ≥ {GOALS['pc_all']})"
        return label

    rows += ["| score | " + " | ".join(head(c) for c in cols) + " |", "|---|" + "---:|" * len(cols)]
    for key, vals in agreement.items():
        cells = []
        for c in cols:
            if vals[c] != vals[c]:  # NaN: undefined, not a figure
                cells.append("n/a")
                continue
            cell = f"{vals[c]:.3f}"
            if key == "csl" and c.startswith("CS top"):
                cell += " " + _ok(vals[c] >= GOALS["cs_top"])
            if key == "csl" and c == "PC all":
                cell += " " + _ok(vals[c] >= GOALS["pc_all"])
            cells.append(cell)
        rows.append(f"| {key} | " + " | ".join(cells) + " |")
    if "reliability" in st:
        rel = st["reliability"]
        rows += ["", f"Fit: the tracked model classifies {st['train_accuracy']:.1%} of its training samples as "
                 f"labelled; the stability models {st['stability_p_in']:.1%} of those they trained on. "
                 f"Split-half reliability of the K-model estimate (even vs odd models, Spearman–Brown): "
                 f"{rel:.3f}, so no score can correlate with it above √{rel:.3f} = {rel ** 0.5:.3f}."]
    return rows + [""]


def render(runs: Sequence[Tuple[dict, str]]) -> str:
    """The section: one subsection per (results, source) experiment, then the notes once."""
    rows: List[str] = [
        f"<!-- BEGIN {NAME} -->",
        "## CSL vs the stability (Feldman–Zhang) estimator: compute and agreement",
        "",
    ]
    for results, source in runs:
        rows += _block(results, source)
    rows += [
        "Ratios are the stability estimator's compute over the CSL run's: a training run with",
        "`memcore.accumulate` as its loss, which records CSL and the other loss statistics (next to it",
        "the same run with plain `F.cross_entropy`: CSL adds nothing a user would notice). The published",
        "K is reached by multiplying the measured time per stability model (each trained on 70% of the",
        "data for the same epochs, then evaluated on all of it) by K.",
        "",
        "Top-k: the k samples the stability estimate ranks as most memorized. ✓ / ✗: CSL meets / "
        "misses the evaluation issue's goal (the CSL paper's CIFAR-100 figures are 0.93 / 0.79).",
    ]
    if any(v != v for results, _ in runs for vals in results["stability"]["agreement"].values()
           for v in vals.values()):
        rows.append("n/a: a correlation is undefined where one side is constant, e.g. when every top-k "
                    "sample has the same memorization estimate (all memorized: 1.0).")
    rows.append(f"<!-- END {NAME} -->")
    return "\n".join(rows)


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("results", nargs="+", help="results.json files written by `python -m memcore experiment`")
    ap.add_argument("-o", "--output", default=str(DEFAULT_OUTPUT))
    args = ap.parse_args(argv)
    runs = []
    for path in args.results:
        with open(path) as f:
            results = json.load(f)
        if "stability" not in results:
            ap.error(f"{path} has no stability experiment (run with --stability-k)")
        runs.append((results, os.path.relpath(path)))
    section = render(runs)
    update_results(args.output, section)
    print(section)
    return 0


if __name__ == "__main__":
    sys.exit(main())
