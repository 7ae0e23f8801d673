"""The stability suite: CSL against the Feldman–Zhang stability estimator of memorization, in compute
and in agreement. The experiment command measures it (`python -m memcore experiment ... --stability-k K`,
docs/evaluation.md) into results/<run>/results.json; this module turns those files into rows of the
benchmark store and declares the suite's notes and goals.

    python -m benchmarks.bench_stability --store    # the rows of results/*/results.json not yet stored

Under pytest it checks that the store holds exactly the figures of results/*/results.json.
"""

import argparse
import datetime
import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Dict, List

from benchmarks import store
from benchmarks.goals import Goal, value

RESULTS = store.ROOT / "results"
NAMES = {"CS": "cosine", "PC": "pearson", "SC": "spearman"}  # the experiment's agreement keys
COMPUTE = {
    "k": "count",
    "plain_seconds": "s",
    "csl_seconds": "s",
    "tracked_seconds": "s",
    "stability_seconds": "s",
}
FIT = ("train_accuracy", "stability_p_in", "reliability")
FIGURE = ("case", "variant", "shape", "metric", "value")  # what the store must agree on

TITLE = "CSL vs the stability (Feldman–Zhang) estimator: compute and agreement"
BY_CASE = True
NOTES = """
*compute*: seconds of a plain training run, of the CSL run (`memcore.accumulate` as its loss), of a run
recording every score, and of the K stability models (each trained on 70 % of the data). The cost goal
extrapolates the time per stability model to K = 2000. train_accuracy: the tracked model's fit of its
training samples; stability_p_in: the stability models' fit of those they trained on; reliability: the
split-half reliability of the K-model estimate (Spearman–Brown), whose square root bounds any score's
correlation with it. *agreement*: each score against the stability estimate, on the k samples it ranks
most memorized (top k) and on all (the CSL paper's CIFAR-100 figures: cosine 0.93 on the top k, Pearson
0.79 on all). Where the Pearson on the top k is undefined (—) the estimate is 1.0 on every top-k sample:
a cosine there measures only how even the scores are and gets no verdict.
"""


def cost_ratio(rows):
    """The stability estimator's compute at K = 2000 over the CSL run's."""
    out = []
    for shape, g in rows[rows.case == "compute"].groupby("shape", sort=False):
        v = g.set_index("metric").value
        if {"k", "stability_seconds", "csl_seconds"} <= set(v.index):
            out.append((shape, 2000 * v.stability_seconds / v.k / v.csl_seconds, g, ""))
    return out


def top_k(kind: str):
    """CSL's ``kind`` agreement on the top k; n/a where the estimate is constant there (Pearson undefined)."""

    def figure(rows):
        csl = rows[(rows.case == "agreement") & (rows.variant == "csl")]
        out = []
        for _, r in csl[csl.metric.str.startswith(f"{kind} top")].iterrows():
            pearson = csl[(csl["shape"] == r["shape"]) & (csl.metric == r.metric.replace(kind, "pearson"))]
            constant = kind == "cosine" and len(pearson) and math.isnan(pearson.value.iloc[0])
            why = (
                "n/a: the estimate is 1.0 on every top-k sample, so a cosine there cannot fail"
                if constant
                else ""
            )
            out.append((f"{r['shape']}, {r.metric}", math.nan if why else r.value, csl.loc[[r.name]], why))
        return out

    return figure


EXPERIMENT = (
    "python -m memcore experiment --dataset mnist --subset 4000 --model mlp --noise '' --stability-k 128 "
    "[--stability-noise 0.1] --epochs 60 --weight-decay 0 --out results/mnist-memorization[-clean]"
)
GOALS = [
    Goal("CSL ≥ 1,000x cheaper than stability at K=2000", "cpu", cost_ratio, ">=", 1000.0, "{:,.0f}x", EXPERIMENT),
    Goal("cosine(CSL, memorization) on the top-k ≥ 0.87", "cpu", top_k("cosine"), ">=", 0.87, "{:.3f}", EXPERIMENT),
    Goal("Pearson(CSL, memorization) on all ≥ 0.79", "cpu", value("pearson all", label="{shape}", variant="csl"),
         ">=", 0.79, "{:.3f}", EXPERIMENT),
    # judged by rank on a set where the estimate varies, at the cosine goal's threshold
    Goal("CSL ranks the most-memorized like the stability estimate, where the estimate varies (Spearman ≥ 0.87)",
         "cpu", top_k("spearman"), ">=", 0.87, "{:.3f}", EXPERIMENT + " (with a rank agreement on a varying set)"),
]  # fmt: skip


def _date(path: Path) -> str:
    """When the results were committed (they carry no date of their own), else the file's time."""
    iso = subprocess.run(
        ["git", "log", "-1", "--format=%cI", "--", str(path)], cwd=store.ROOT, capture_output=True, text=True
    ).stdout.strip()
    when = (
        datetime.datetime.fromisoformat(iso) if iso else datetime.datetime.fromtimestamp(path.stat().st_mtime)
    )
    return when.astimezone(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def experiment_rows(path: Path) -> List[Dict[str, str]]:
    """The store rows of one experiment's results.json (none without a stability run)."""
    d = json.loads(path.read_text())
    st, cfg = d.get("stability", {}), d["config"]
    if "csl_seconds" not in st:
        return []
    noise = cfg.get("stability_noise") or 0.0
    train = cfg["train"]
    base = dict(
        suite="stability",
        shape=f"{cfg['dataset']} {cfg['subset']}, {f'{noise:.0%} noise' if noise else 'clean labels'}, K={st['k']}",
        device="cpu",
        machine="not recorded",
        date=_date(path),
        note=f"{cfg['model']}, {train['epochs']} epochs, batch {train['batch_size']}, lr {train['lr']}, weight decay "
        f"{train['weight_decay']}: `{d['command']}`",
    )
    out = [store.row(**base, case="compute", metric=m, value=st[m], unit=u) for m, u in COMPUTE.items()]
    out += [store.row(**base, case="compute", metric=m, value=st[m]) for m in FIT if m in st]
    for score, agreement in st["agreement"].items():
        for key, v in agreement.items():
            prefix, _, rest = key.partition(" ")
            metric = f"{NAMES.get(prefix, prefix)} {rest}"
            out.append(store.row(**base, case="agreement", variant=score, metric=metric, value=v))
    return out


def all_rows(folder: Path = RESULTS) -> List[Dict[str, str]]:
    return [r for path in sorted(folder.glob("*/results.json")) for r in experiment_rows(path)]


def _figures(rows) -> set:
    return {tuple(r[k] for k in FIGURE) for r in rows}


def test_store_holds_the_experiments():
    """results.csv's stability rows are the figures of results/*/results.json, no more, no fewer."""
    import csv

    with open(store.STORE) as f:
        stored = [r for r in csv.DictReader(f) if r["suite"] == "stability"]
    assert _figures(stored) == _figures(all_rows()), "run `python -m benchmarks.bench_stability --store`"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--store", nargs="?", const=str(store.STORE), default=None, help="append to this store")
    args = ap.parse_args(argv)
    rows = all_rows()
    if args.store:
        import csv

        with open(args.store) as f:
            have = _figures(csv.DictReader(f))
        new = [r for r in rows if tuple(r[k] for k in FIGURE) not in have]
        print(f"[memcore] stored {store.append(new, args.store)} rows in {args.store}", file=sys.stderr)
    else:
        for r in rows:
            print(r["case"], r["variant"], r["shape"], r["metric"], r["value"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
