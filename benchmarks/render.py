"""Writes benchmarks/RESULTS.md whole from the benchmark store, benchmarks/results.csv: the goals every
suite declares, judged on the figures of the store, then one section per suite, its rows pivoted (a line
per case, variant, shape, dtype, device and threads; a column per metric) and its notes. Nothing in
RESULTS.md is typed by hand.

    python -m benchmarks.render
"""

import argparse
import importlib
import inspect
import math
import re
import sys
from pathlib import Path
from typing import List, Optional, Sequence

import pandas as pd

from benchmarks.store import STORE

OUT = Path(__file__).resolve().parent / "RESULTS.md"
# store suite -> the module that measures it and declares its TITLE, NOTES and GOALS (optional:
# BY_CASE, a table per case; LATEST_RUN, only the latest run per device; plot(rows, folder))
SUITES = {
    "cross_entropy": "benchmarks.bench_cross_entropy",
    "linear_cross_entropy": "benchmarks.bench_linear_cross_entropy",
    "curvature": "benchmarks.bench_curvature",
    "training_step": "benchmarks.bench_training_step",
    "scaling": "benchmarks.bench_scaling",
    "shard": "benchmarks.bench_shard",
    "stability": "benchmarks.bench_stability",
    "sass": "tools.sass_report",
    "gpu": "tools.gpu_store",
}
KEY = ["suite", "case", "variant", "shape", "dtype", "device", "threads", "metric"]
LINE = ["case", "variant", "shape", "dtype", "device", "threads"]  # what a table's line is
ABOUT = ["machine", "torch", "date", "commit", "note"]  # said once above a table where all lines share it


def load(path: Path = STORE) -> pd.DataFrame:
    """The published rows: per figure (KEY) the latest row measured on a clean tree, else (no clean one)
    the latest from a modified or unrecorded tree, marked in its commit column."""
    df = pd.read_csv(path, dtype=str, keep_default_na=False)
    df["value"] = df["value"].astype(float)
    df = df.sort_values(["date"], kind="stable").sort_values("dirty", key=lambda d: d == "0", kind="stable")
    df = df.drop_duplicates(KEY, keep="last").sort_index()
    df["commit"] = [
        f"{c[:7]}{'' if d == '0' else '+dirty'}" if c else "unrecorded" for c, d in zip(df.commit, df.dirty)
    ]
    return df


def suites(df: pd.DataFrame):
    """(module, its published rows) per suite, in SUITES order."""
    unknown = set(df.suite) - set(SUITES)
    if unknown:
        raise ValueError(f"store suites without a module in render.SUITES: {sorted(unknown)}")
    for name, module in SUITES.items():
        mod, rows = importlib.import_module(module), df[df.suite == name]
        if getattr(mod, "LATEST_RUN", False) and len(rows):  # a run replaces the last whole
            rows = rows[rows.date == rows.groupby("device").date.transform("max")]
        yield mod, rows


# ------------------------------------------------------------------------------------ formatting
def fmt(v: Optional[float], unit: str = "") -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "—"
    if unit == "count":
        return f"{v:,.0f}"
    for bound, spec in ((100, ".0f"), (10, ".1f"), (1, ".2f"), (0.01, ".3f")):
        if abs(v) >= bound:
            return f"{v:{spec}}"
    return f"{v:.2g}"


def markdown(head: Sequence[str], lines: Sequence[Sequence[str]]) -> List[str]:
    out = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    return out + ["| " + " | ".join(map(str, line)) + " |" for line in lines] + [""]


def joined(values) -> str:
    return ", ".join(sorted({v for v in values if v}))


def table(rows: pd.DataFrame) -> List[str]:
    """One line per case / variant / shape / dtype / device / threads, one column per metric (in the
    order measured); what every line shares is said once above the table."""
    notes = list(dict.fromkeys(n for n in rows.note if n))
    several = rows.note.nunique() > 1  # then a column refers to the notes by number
    rows = rows.assign(
        date=rows.date.str[:10], note=[f"[{notes.index(n) + 1}]" if n else "" for n in rows.note]
    )
    index = [c for c in LINE if rows[c].nunique() > 1] or ["variant"]
    about = [c for c in ABOUT if rows[c].nunique() > 1]
    shared = [
        c for c in LINE[1:] + ABOUT[:-1] if c not in index + about and rows[c].iloc[0]
    ]  # case: the heading
    out = ["- " + "; ".join(f"{c}: {rows[c].iloc[0]}" for c in shared)] if shared else []
    out += [f"- note{f' [{i + 1}]' if several else ''}: {n}" for i, n in enumerate(notes)] + [""]
    metrics = list(dict.fromkeys(rows.metric))
    units = dict(zip(rows.metric, rows.unit))
    order = {c: {v: i for i, v in enumerate(dict.fromkeys(rows[c]))} for c in index}

    def sort_key(key):  # shapes by size, the rest in the order measured
        size = lambda v: (math.prod(map(int, re.findall(r"\d+", v))), v)  # noqa: E731
        return [size(v) if c == "shape" else order[c][v] for c, v in zip(index, key)]

    lines = []
    for key, g in sorted(rows.groupby(index, sort=False), key=lambda kg: sort_key(kg[0])):
        values = dict(zip(g.metric, g.value))
        lines.append([*key, *(fmt(values.get(m), units[m]) for m in metrics), *(joined(g[c]) for c in about)])
    heads = [
        m if not units[m] or units[m].lower() in m.lower() or units[m] == "count" else f"{m} ({units[m]})"
        for m in metrics
    ]
    return out + markdown(index + heads + about, lines)


def section(mod, rows: pd.DataFrame) -> List[str]:
    out = [f"## {mod.TITLE}", ""]
    for case, part in rows.groupby("case", sort=False) if getattr(mod, "BY_CASE", False) else [(None, rows)]:
        out += ([f"### {case}", ""] if case else []) + table(part)
    return out + [inspect.cleandoc(mod.NOTES), ""]


# ------------------------------------------------------------------------------------ goals
def verdict(text: str, op: str, threshold: float) -> str:
    shown = float(re.sub(r"[^0-9.+-]", "", text))  # judged as printed
    return "✓" if (shown <= threshold if op == "<=" else shown >= threshold) else "✗"


def goals_table(parts) -> List[str]:
    lines = []
    for mod, rows in parts:
        for g in mod.GOALS:
            figures = g.figure(rows[(rows.device == "cpu") == (g.device == "cpu")])
            if not figures:
                lines.append([g.wording, "", g.device, f"not measured: `{g.command}`", "", "—"])
            for case, value, src, why in figures:
                text = why if value != value else g.fmt.format(value)
                judged = "—" if value != value else verdict(text, g.op, g.threshold)
                lines.append(
                    [
                        g.wording,
                        case,
                        f"{g.device} ({joined(src.machine)})",
                        text,
                        joined(src.date.str[:10]),
                        judged,
                    ]
                )
    counts = pd.Series([line[-1] for line in lines]).value_counts()
    return [
        "## Goals at a glance",
        "",
        f"{counts.get('✓', 0)} met, {counts.get('✗', 0)} missed, {counts.get('—', 0)} not measured or n/a. A "
        "verdict is given only on the figure its goal is judged by, taken as printed; the sections below hold "
        "the details.",
        "",
        *markdown(["goal", "case", "device", "measured", "date", "verdict"], lines),
    ]


# ------------------------------------------------------------------------------------ main
def render(df: pd.DataFrame) -> str:
    parts = list(suites(df))
    head = [
        "# memcore benchmark results",
        "",
        "Generated by `python -m benchmarks.render` from `benchmarks/results.csv`, one row per measured figure "
        "(DEVELOPMENT.md, Benchmarks, names the commands that measure them). Do not edit by hand. The commit "
        "names the code a figure was measured on: `+dirty` a working tree with changes, `unrecorded` not "
        "recorded; such a figure is shown only where no figure of a clean tree exists.",
        "",
    ]
    body = [line for mod, rows in parts if len(rows) for line in section(mod, rows)]
    return "\n".join(head + goals_table(parts) + body).rstrip("\n") + "\n"


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--store", type=Path, default=STORE)
    ap.add_argument("-o", "--output", type=Path, default=OUT)
    args = ap.parse_args(argv)
    df = load(args.store)
    args.output.write_text(render(df))
    for mod, rows in suites(df):
        if hasattr(mod, "plot") and len(rows):
            mod.plot(rows, args.output.parent)
    print(f"[memcore] wrote {args.output}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
