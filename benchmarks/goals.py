"""What a benchmark goal is. Each suite declares its own ``GOALS`` next to its benchmark
(benchmarks/bench_<suite>.py, tools/sass_report.py); benchmarks/render.py judges them in RESULTS.md.

A goal's ``figure`` maps the suite's published rows on the goal's device to the figures the goal is
judged by, one per case: (case, value, the rows it comes from, why it is undefined). A NaN value with
a reason is shown as that reason, without a verdict. The verdict is taken on the value as printed
(``fmt``), so a figure never reads 1.10 with ✗.
"""

from typing import Callable, List, NamedTuple, Tuple

Figure = Tuple[str, float, object, str]  # case, value, its rows (a DataFrame), why n/a ("" if defined)


class Goal(NamedTuple):
    wording: str
    device: str  # "cpu" or "cuda" (static SASS rows, device sm_XX, count as cuda)
    figure: Callable[[object], List[Figure]]
    op: str  # "<=" or ">="
    threshold: float
    fmt: str  # how the figure is printed; the verdict uses the printed value
    command: str  # what measures it, shown while it is not measured


def ratio(metric: str, a: str, b: str, scale=1.0, offset=0.0, label="{shape} {dtype}", **match):
    """scale * (a / b - offset): ``metric`` of variant ``a`` over variant ``b`` in the same case,
    shape, dtype, device and thread count; ``match``: column -> allowed values (e.g. shape=(...))."""

    def figure(rows):
        rows = select(rows, metric, match)
        threads = rows.threads.nunique() > 1  # then the case names its thread count
        out = []
        for _, g in rows.groupby(["case", "shape", "dtype", "device", "threads"], sort=False):
            v = g.set_index("variant").value
            if a in v and b in v:
                case = label.format(**g.iloc[0]) + (f", threads {g.threads.iloc[0]}" if threads else "")
                out.append((case, scale * (v[a] / v[b] - offset), g[g.variant.isin([a, b])], ""))
        return out

    return figure


def value(metric: str, scale=1.0, offset=0.0, label="{shape} {dtype}", **match):
    """scale * (value - offset) of ``metric``, one figure per row; ``match`` as in ratio."""

    def figure(rows):
        rows = select(rows, metric, match)
        return [
            (label.format(**r), scale * (r.value - offset), rows.loc[[i]], "") for i, r in rows.iterrows()
        ]

    return figure


def select(rows, metric: str, match: dict):
    rows = rows[rows.metric == metric]
    for column, allowed in match.items():
        rows = rows[rows[column].isin(allowed if isinstance(allowed, (list, tuple, set)) else [allowed])]
    return rows
