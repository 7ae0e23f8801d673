"""Writes benchmarks/RESULTS.md whole (and scaling.png) from the benchmark store, benchmarks/results.csv,
and the stability experiments' results/*/results.json. Nothing in RESULTS.md is edited by hand.

    python -m benchmarks.render                  # rows from modified (dirty) trees are left out
    python -m benchmarks.render --allow-dirty    # ... or published, marked as such
"""

import argparse
import json
import math
import re
import subprocess
import sys
from pathlib import Path
from typing import List, Optional, Sequence

import pandas as pd

from benchmarks.goals import GOALS, LINEAR_SHAPES
from benchmarks.store import ROOT, STORE

OUT = Path(__file__).resolve().parent / "RESULTS.md"
KEY = ["suite", "case", "variant", "shape", "dtype", "device", "threads", "metric"]
CE_VARIANTS = ["plain", "eager", "memcore", "memcore_overwrite", "liger"]
STEP_VARIANTS = ["memcore", "memcore+inputs", "plain+xgrad", "memcore+overwrite"]
LINEAR_VARIANTS = ["plain", "plain_eager", "accumulate", "linear", "liger"]
ELEMENT_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


# ------------------------------------------------------------------------------------ store
def load(path: Path = STORE, allow_dirty: bool = False):
    """(published rows, how many figures were left out): the latest row per figure; rows from dirty or
    unrecorded trees left out unless ``allow_dirty`` (a clean older figure then stands)."""
    df = pd.read_csv(path, dtype=str, keep_default_na=False)
    df["value"] = df["value"].astype(float)
    df = df.sort_values("date", kind="stable")
    clean = df["dirty"] == "0"
    if allow_dirty:
        return df.drop_duplicates(KEY, keep="last"), 0
    return df[clean].drop_duplicates(KEY, keep="last"), len(df[~clean].drop_duplicates(KEY))


def provenance(rows: pd.DataFrame) -> str:
    """Commit(s) of a table row's figures: the short hash, '+dirty' for a modified tree."""
    tags = {
        f"{c[:7]}{'+dirty' if d != '0' else ''}" if c else "unrecorded"
        for c, d in zip(rows.commit, rows.dirty)
    }
    return ", ".join(sorted(tags))


def meta(rows: pd.DataFrame) -> dict:
    return {"date": ", ".join(sorted({d[:10] for d in rows.date})), "commit": provenance(rows)}


def wide(df: pd.DataFrame, index: List[str], metric: str, columns: str = "variant") -> pd.DataFrame:
    """One row per ``index``, one column per ``columns`` value: the metric's values."""
    return df[df.metric == metric].pivot_table(index=index, columns=columns, values="value", aggfunc="first")


def at(frame: pd.DataFrame, key, column) -> Optional[float]:
    """frame[column] at row ``key``; None where either is absent."""
    return frame.loc[key].get(column) if key in frame.index else None


def div(a: Optional[float], b: Optional[float]) -> Optional[float]:
    return a / b if a is not None and b is not None and not math.isnan(a) and b else None


# ------------------------------------------------------------------------------------ formatting
def fmt(v: Optional[float], kind: str = "ms") -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "—"
    if kind == "x":
        return f"{v:.2f}"
    if kind == "pct":
        return f"{round(100 * (v - 1), 1) + 0.0:+.1f} %"
    if kind == "int":
        return f"{v:,.0f}"
    return (
        f"{v:.0f}"
        if v >= 100
        else f"{v:.1f}"
        if v >= 10
        else f"{v:.2f}"
        if v >= 1
        else f"{v:.3f}"
        if v >= 0.01
        else f"{v:.2g}"
    )


def markdown(frame: pd.DataFrame) -> str:
    """A pipe table (tabulate, which DataFrame.to_markdown needs, is not a dependency)."""
    head = [str(c) for c in frame.columns]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in frame.itertuples(index=False)]
    return "\n".join(lines)


def header(rows: pd.DataFrame) -> List[str]:
    out = [f"- Machine: {'; '.join(sorted(set(rows.machine)))}; torch {', '.join(sorted(set(rows.torch)))}"]
    return out + [f"- Note: {n}" for n in dict.fromkeys(rows.note) if n]


def _gpu_todo(rows: pd.DataFrame) -> List[str]:
    if (rows.device == "cuda").any():
        return []
    return ["GPU: not measured yet — on a CUDA machine run `bash scripts/gpu_session.sh build bench`.", ""]


# ------------------------------------------------------------------------------------ sections
def cross_entropy(df: pd.DataFrame) -> List[str]:
    rows = df[(df.suite == "cross_entropy") & (df.case == "loss")]
    if rows.empty:
        return []
    idx = ["shape", "dtype", "device", "threads"]
    med, rnd = wide(rows, idx, "median_ms"), wide(rows, idx, "rounds")
    med = med.reindex(sorted(med.index, key=lambda k: (k[2], math.prod(map(int, k[0].split("x"))))))
    variants = [v for v in CE_VARIANTS if v in med]
    table = pd.DataFrame(
        [
            dict(zip(["N x C", "dtype", "device", "threads"], k))
            | {
                **{f"{v} (ms)": fmt(r.get(v)) for v in variants},
                "memcore / plain": fmt(div(r.get("memcore"), r.get("plain")), "x"),
                "eager / memcore": fmt(div(r.get("eager"), r.get("memcore")), "x"),
                **(
                    {"memcore_overwrite / plain": fmt(div(r["memcore_overwrite"], r.get("plain")), "x")}
                    if "memcore_overwrite" in r
                    else {}
                ),
                **({"memcore / liger": fmt(div(r.get("memcore"), r["liger"]), "x")} if "liger" in r else {}),
                "rounds": " / ".join(fmt(at(rnd, k, v), "int") for v in variants),
                **meta(rows[(rows["shape"] == k[0]) & (rows.device == k[2])]),
            }
            for k, r in med.iterrows()
        ]
    )
    return [
        "## Cross-entropy kernel: memcore.accumulate vs F.cross_entropy",
        "",
        *header(rows),
        "",
        markdown(table),
        "",
        *_gpu_todo(rows),
        "Median wall time of one forward + backward pass over the same logits tensor (CPU: float32, CUDA: "
        "bfloat16). *plain*: `F.cross_entropy(...).backward()`, no statistics. *eager*: the same six per-sample "
        "statistics memcore records, gathered with unfused PyTorch ops and `index_add_` into a float64 buffer. "
        "*memcore*: `memcore.accumulate(...).backward()`; *memcore_overwrite*: the same with "
        "`overwrite_logits=True` (a fresh copy of the logits each round, outside the timing); *liger*: "
        "`liger_kernel`'s `LigerCrossEntropyLoss` (CUDA). Rounds in the order of the time columns.",
        "",
    ]


def training_step(df: pd.DataFrame) -> List[str]:
    rows = df[df.suite == "training_step"]
    if rows.empty:
        return []
    idx = ["case", "shape", "dtype", "device", "threads"]
    med, ratio = wide(rows, idx, "median_ms"), wide(rows, idx, "interleaved_ratio")
    lo, hi = wide(rows, idx, "interleaved_ratio_lo"), wide(rows, idx, "interleaved_ratio_hi")
    rounds, rnd = wide(rows, idx, "interleaved_rounds"), wide(rows, idx, "rounds")

    def inter(k, v):
        if at(ratio, k, v) is None or math.isnan(ratio.loc[k][v]):
            return "—"
        ci = (
            f" [{fmt(at(lo, k, v), 'pct')[:-2]}, {fmt(at(hi, k, v), 'pct')[:-2]}]"
            if at(lo, k, v) is not None
            else ""
        )
        return fmt(ratio.loc[k][v], "pct") + ci

    table = pd.DataFrame(
        [
            dict(zip(["model", "batch", "dtype", "device", "threads"], k))
            | {
                "plain step (ms)": fmt(at(med, k, "plain")),
                **{f"{v} step (ms)": fmt(at(med, k, v)) for v in ("memcore", "memcore+inputs")},
                **{
                    f"{v} overhead, separate tests": fmt(div(at(med, k, v), at(med, k, "plain")), "pct")
                    for v in ("memcore", "memcore+inputs")
                },
                **{f"interleaved: {v} overhead [95 % CI]": inter(k, v) for v in STEP_VARIANTS},
                "rounds (plain / memcore / +inputs / interleaved)": " / ".join(
                    [fmt(at(rnd, k, v), "int") for v in ("plain", "memcore", "memcore+inputs")]
                    + [fmt(rounds.loc[k].max() if k in rounds.index else None, "int")]
                ),
                **meta(rows[(rows.case == k[0]) & (rows["shape"] == k[1]) & (rows.device == k[3])]),
            }
            for k in ratio.index
        ]
    )
    return [
        "## Training step: plain F.cross_entropy vs memcore.accumulate",
        "",
        *header(rows),
        "",
        markdown(table),
        "",
        *_gpu_todo(rows),
        "One round is a whole training step on a fixed random batch: `zero_grad`, forward, loss, backward, SGD "
        "step (momentum 0.9). *small_cnn*: `memcore.eval.models.small_cnn` on 3x32x32 inputs, 10 classes. "
        "*resnet18*: `benchmarks/resnet.py`, bf16 autocast. *lm*: embedding(V, 256) + linear(256, V) on B "
        "sequences x T tokens, the last 0..T/4 targets of each sequence -100. *memcore+inputs*: "
        "`accumulate(..., inputs=x)` (its cost includes the first layer's input gradient); *plain+xgrad*: a "
        "plain step with `x.requires_grad_()`, that cost alone; *memcore+overwrite*: `overwrite_logits=True`. "
        "*Separate tests*: medians of one test per variant, which drift with the machine's load between tests; "
        "*interleaved*: one round runs every variant back to back (rotating order), median over rounds of the "
        "per-round ratio to plain with a distribution-free 95 % CI. The goals are judged on the interleaved "
        "figures only.",
        "",
    ]


def scaling(df: pd.DataFrame) -> List[str]:
    rows = df[df.suite == "scaling"]
    if rows.empty:
        return []
    out = ["## Scaling: loss time vs C and N, tracker vs dataset size", "", *header(rows), ""]
    for sweep, axis in (("C", 1), ("N", 0)):
        part = rows[rows.case == f"loss vs {sweep}"]
        if part.empty:
            continue
        idx = ["shape", "dtype", "device", "threads"]
        med, peak = wide(part, idx, "median_ms"), wide(part, idx, "peak_mib")
        med = med.reindex(sorted(med.index, key=lambda k: (k[2], int(k[0].split("x")[axis]))))
        variants = [v for v in CE_VARIANTS if v in med]
        table = pd.DataFrame(
            [
                dict(zip(["N x C", "dtype", "device", "threads"], k))
                | {
                    **{f"{v} (ms)": fmt(r.get(v)) for v in variants},
                    "eager / memcore": fmt(div(r.get("eager"), r.get("memcore")), "x"),
                    **{f"{v} peak (MiB)": fmt(at(peak, k, v)) for v in variants},
                    **meta(part[(part["shape"] == k[0]) & (part.device == k[2])]),
                }
                for k, r in med.iterrows()
            ]
        )
        fixed = sorted({s.split("x")[1 - axis] for s in part["shape"]})
        out += [
            f"### Forward + backward vs {sweep} ({'N' if sweep == 'C' else 'C'} = {', '.join(fixed)})",
            "",
            markdown(table),
            "",
        ]
    trk = rows[rows.case == "tracker"]
    if not trk.empty:
        t = trk.pivot_table(
            index=["shape", "device", "threads"], columns="metric", values="value", aggfunc="first"
        )
        t = t.reindex(sorted(t.index, key=lambda k: int(k[0])))
        table = pd.DataFrame(
            [
                {
                    "num_samples": fmt(float(k[0]), "int"),
                    "device": k[1],
                    "threads": k[2],
                    "end_epoch() + scores() (ms)": fmt(r["median_ms"]),
                    "per 1M samples (ms)": fmt(r["median_ms"] * 1e6 / int(k[0])),
                    "tracker state (MiB)": fmt(r.get("state_mib")),
                    "peak (MiB)": fmt(r.get("peak_mib")),
                    "rounds": fmt(r["rounds"], "int"),
                    **meta(trk[trk["shape"] == k[0]]),
                }
                for k, r in t.iterrows()
            ]
        )
        out += [
            "### Tracker: `end_epoch()` + `scores()` vs dataset size (every sample seen once)",
            "",
            markdown(table),
            "",
        ]
    return out + [
        *_gpu_todo(rows),
        "![time vs C and N](scaling.png)",
        "",
        "Median wall time of one forward + backward pass over one logits tensor, variants as in the "
        "cross-entropy section. Peak: memory torch allocated during one forward + backward above what was "
        "allocated before it, the logits gradient included (`torch.cuda.max_memory_allocated()` on CUDA; "
        "on the CPU the running sum of the allocator's events recorded by `torch.profiler`, "
        "`benchmarks/memory.py`). Tracker state: every tensor of `state_dict()`.",
        "",
    ]


def linear_ce(df: pd.DataFrame) -> List[str]:
    rows = df[df.suite == "linear_cross_entropy"]
    if rows.empty:
        return []
    idx = ["shape", "dtype", "device", "threads"]
    med, peak = wide(rows, idx, "median_ms"), wide(rows, idx, "peak_mib")
    keys = sorted(
        set(med.index) | set(peak.index), key=lambda k: (k[2], math.prod(map(int, k[0].split("x"))))
    )
    variants = [v for v in LINEAR_VARIANTS if v in med or v in peak]
    others = [v for v in variants if v != "plain"]

    def w_grad(k):  # the weight gradient [V, H] in the weight's dtype: every variant returns it
        _, h, v = map(int, k[0].split("x"))
        return div(v * h * ELEMENT_BYTES.get(k[1], 4) / 2**20, at(peak, k, "plain"))

    table = pd.DataFrame(
        [
            dict(zip(["N x H x V", "dtype", "device", "threads"], k))
            | {
                **{f"{v} (ms)": fmt(at(med, k, v)) for v in variants},
                **{f"{v} peak (MiB)": fmt(at(peak, k, v)) for v in variants},
                f"time / plain ({', '.join(others)})": " / ".join(
                    fmt(div(at(med, k, v), at(med, k, "plain")), "x") for v in others
                ),
                f"peak / plain ({', '.join(others)})": " / ".join(
                    fmt(div(at(peak, k, v), at(peak, k, "plain")), "x") for v in others
                ),
                "grad_weight / plain peak": fmt(w_grad(k), "x"),
                **meta(rows[(rows["shape"] == k[0]) & (rows.device == k[2])]),
            }
            for k in keys
        ]
    )
    return [
        "## Fused linear + cross-entropy: memcore.linear_accumulate vs F.linear + F.cross_entropy",
        "",
        *header(rows),
        "",
        markdown(table),
        "",
        *(
            [
                "GPU: not measured yet (N=8192, H=4096, V=128256 bf16 against Liger's fused linear cross-entropy; "
                "the CUDA cases of `benchmarks/test_bench_linear_ce.py`, run by `bash scripts/gpu_session.sh`).",
                "",
            ]
            if not (rows.device == "cuda").any()
            else []
        ),
        "Wall time of one forward + backward from the same hidden [N, H] and weight [V, H] "
        "(`benchmarks/test_bench_linear_ce.py`; the multi-GiB CPU shapes run one round, so their times are "
        "single measurements). *plain*: `F.cross_entropy(F.linear(h, W), t).backward()`; *plain_eager*: plain "
        "plus the six statistics with unfused ops and `index_add_`; *accumulate*: `memcore.accumulate` on "
        "`F.linear`'s logits; *linear*: `memcore.linear_accumulate` (never materializes the [N, V] logits). "
        "Peak: memory the allocator handed out during one forward + backward above what was allocated before "
        "it (the inputs), `benchmarks/memory.py`; it includes the gradients of hidden and weight. "
        "*grad_weight / plain peak*: the [V, H] weight gradient alone against plain's peak; no variant "
        "can go below it, so where it exceeds 25 % (fp32 at V=128,256, H=2,048: 1,002 MiB) the 25 % memory "
        "goal is out of reach for a gradient of the weight's dtype, and the figure to watch is how little "
        "linear adds on top of it. Ratios are judged at the issue's shapes only; the tiny shape is the quick-mode "
        "smoke test, where fixed costs dominate.",
        "",
    ]


def shard(df: pd.DataFrame) -> List[str]:
    rows = df[df.suite == "shard"]
    if rows.empty:
        return []
    out = ["## Dataset scale: compact and sharded tracker state", "", *header(rows), ""]
    st = rows[(rows.case == "state") & (rows.metric == "bytes_per_sample")]
    if not st.empty:
        table = pd.DataFrame(
            [
                {
                    "layout": r.variant,
                    "measured on (samples)": fmt(float(r["shape"]), "int") if r["shape"] else "—",
                    "bytes / sample": f"{r.value:.1f}",
                    "date": r.date[:10],
                    "commit": provenance(st[st.variant == r.variant]),
                }
                for _, r in st.iterrows()
            ]
        )
        out += [
            "### Tracker state per sample (`Tracker.state_bytes()`, what `state_dict()` holds)",
            "",
            markdown(table),
            "",
            "Sharded: each rank holds the same per sample for ceil(N / world) samples.",
            "",
        ]
    sc = rows[rows.case == "scale"]
    if not sc.empty:
        t = sc.pivot_table(index=["shape", "variant"], columns="metric", values="value", aggfunc="first")

        def span(r, m):
            lo, hi = r.get(f"{m}_min"), r.get(m)
            return fmt(hi) if lo is None or lo != lo or fmt(lo) == fmt(hi) else f"{fmt(lo)}–{fmt(hi)}"

        table = pd.DataFrame(
            [
                {
                    "num_samples": fmt(float(k[0]), "int"),
                    "ranks": k[1],
                    "state / rank (MiB)": fmt(r.get("state_mib_per_rank")),
                    "peak RSS / rank after end_epoch (MiB)": fmt(r.get("peak_rss_mib")),
                    "... after to_parquet (MiB)": fmt(r.get("peak_rss_parquet_mib")),
                    "end_epoch() (s)": span(r, "end_epoch_s"),
                    "to_parquet() / rank (s)": span(r, "to_parquet_s"),
                    "Parquet file / rank (MiB)": fmt(r.get("parquet_mib")),
                    **meta(sc[sc["shape"] == k[0]]),
                }
                for k, r in t.iterrows()
            ]
        )
        out += [
            "### Sharded tracker at scale (`python benchmarks/bench_shard.py scale N --no-scores`)",
            "",
            markdown(table),
            "",
            "Times: fastest–slowest rank; memory: the largest rank.",
            "",
        ]
    sp = rows[rows.case.str.startswith("step")]
    if not sp.empty:
        idx = ["case", "shape", "threads"]
        med, ratio, rnd = (wide(sp, idx, f"interleaved_{m}") for m in ("median_ms", "ratio", "rounds"))
        table = pd.DataFrame(
            [
                {
                    "setup": f"{k[0]}, {k[1]}",
                    "unsharded (ms)": fmt(at(med, k, "unsharded")),
                    "sharded (ms)": fmt(at(med, k, "sharded")),
                    "interleaved: sharded overhead": fmt(at(ratio, k, "sharded"), "pct"),
                    "rounds": fmt(rnd.loc[k].max() if k in rnd.index else None, "int"),
                    **meta(sp[sp.case == k[0]]),
                }
                for k in med.index
            ]
        )
        out += [
            "### Routing overhead of a training step (`python benchmarks/bench_shard.py step`)",
            "",
            markdown(table),
            "",
            "Small CNN under DDP on every rank (both variants sync gradients every step), 128-row batches, "
            "flush every 64 steps; a round runs both variants back to back (alternating order), medians over "
            "rounds of the mean step time. No confidence interval is recorded: on a loaded machine a few "
            "percent is within its noise (see the notes).",
            "",
        ]
    return out


def sass(df: pd.DataFrame) -> List[str]:
    """Static figures of the compiled CUDA kernels (suite "sass", device = the arch), one row per instance."""
    rows = df[df.suite == "sass"]
    if rows.empty:
        return []
    t = rows.pivot_table(
        index=["device", "case", "variant", "dtype"], columns="metric", values="value", aggfunc="first"
    )
    table = pd.DataFrame(
        [
            {
                "arch": k[0],
                "kernel": k[1],
                "instance": k[2],
                "dtype": k[3],
                **{m: fmt(r.get(m)) for m in t.columns},
            }
            for k, r in t.iterrows()
        ]
    )
    return [
        "## CUDA kernels, static: SASS instructions per element (`python -m benchmarks.sass_report`)",
        "",
        f"- Built by: {'; '.join(sorted(set(rows.machine)))}; {meta(rows)['date']} ({meta(rows)['commit']})",
        *[f"- Note: {n}" for n in dict.fromkeys(rows.note) if n],
        "",
        markdown(table),
        "",
        "Read from the compiled code, no GPU: instr_per_elem on the main loop's hot path, half_per_elem of "
        "them on a half-rate pipe, spill_bytes spill stores + loads (`benchmarks/sass_report.py` explains the "
        "count).",
        "",
    ]


def plot(df: pd.DataFrame, path: Path) -> None:
    """scaling.png: time vs C and vs N, log-log, one line per variant and device."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = df[(df.suite == "scaling") & (df.metric == "median_ms")]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.6))
    for ax, (sweep, axis) in zip(axes, (("C", 1), ("N", 0))):
        part = rows[rows.case == f"loss vs {sweep}"]
        for (variant, device), g in part.groupby(["variant", "device"]):
            g = g.assign(x=[int(s.split("x")[axis]) for s in g["shape"]]).sort_values("x")
            ax.plot(
                g.x,
                g.value,
                marker="o",
                linestyle="-" if device == "cpu" else "--",
                label=f"{variant} ({device})",
            )
        ax.set(
            xscale="log",
            yscale="log",
            xlabel=sweep,
            ylabel="forward + backward (ms)",
            title=f"time vs {sweep}",
        )
        ax.grid(True, which="both", alpha=0.3)
        if not part.empty:
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def curvature(df: pd.DataFrame) -> List[str]:
    rows = df[df.suite == "curvature"]
    if rows.empty:
        return [
            "## Input-loss curvature: memcore.curvature vs the reference algorithm",
            "",
            "Not measured: `python -m benchmarks.test_bench_curvature --rounds 15 --write`.",
            "",
        ]
    out = ["## Input-loss curvature: memcore.curvature vs the reference algorithm", ""]
    for device, part in rows.groupby("device"):
        main = part[part.case == "10 probes"]
        t = main.pivot_table(index="variant", columns="metric", values="value", aggfunc="first")
        batch = int(main["shape"].iloc[0].split("x")[0])
        ref = t.loc["reference"]
        table = pd.DataFrame(
            [
                {
                    "method": m,
                    "best s / batch": fmt(r.best_s),
                    "median s / batch": fmt(r.median_s),
                    "samples/s (best)": fmt(batch / r.best_s, "int"),
                    "samples/s (median)": fmt(batch / r.median_s, "int"),
                    "best CPU s / batch": fmt(r.get("best_cpu_s")),
                    "peak extra memory (MiB)": fmt(r.get("peak_mib")),
                    "speedup vs reference (best / median)": "—"
                    if m == "reference"
                    else f"{ref.best_s / r.best_s:.2f}x / {ref.median_s / r.median_s:.2f}x",
                }
                for m, r in t.iterrows()
            ]
        )
        out += [
            f"### {device.upper()}",
            "",
            *header(part),
            f"- Shapes: `small_cnn` (benchmarks/curvature_reference.py), inputs "
            f"[{main['shape'].iloc[0].replace('x', ', ')}] "
            f"{main['dtype'].iloc[0]}, 10 classes; {fmt(t['rounds'].max(), 'int')} interleaved rounds; "
            f"{meta(main)['date']} ({meta(main)['commit']})",
            "",
            markdown(table),
            "",
        ]
        for case, g in part[~part.case.isin(["10 probes", "100 probes"])].groupby("case"):
            best = g[g.metric == "best_s"].set_index("variant").value
            out += [
                f"With {case} (best of {fmt(g[g.metric == 'rounds'].value.max(), 'int')} interleaved rounds): "
                f"reference {best['reference']:.3f} s, memcore {best['memcore']:.3f} s per batch: "
                f"{best['reference'] / best['memcore']:.2f}x.",
                "",
            ]
        rho = part[part.metric == "spearman_vs_reference"]
        if not rho.empty:
            out += [
                f"Spearman rank correlation of the two methods' scores on the same model and inputs "
                f"({rho.case.iloc[0]} each, different random probes): {rho.value.iloc[0]:.4f}",
                "",
            ]
    return out + [
        "*reference*: `benchmarks/curvature_reference.py`, the public implementation's algorithm (per "
        "probe a clean and a perturbed forward and one backward). *memcore*: `memcore.curvature` (one clean "
        "pass, probes batched into passes of at most max_rows rows; memcore_max_rows_512: 512 rows). Per "
        "batch memcore runs n + 1 forward/backward passes, the reference 2n, so where the model's passes "
        "dominate the speedup is about 2n/(n+1) = 1.82x at 10 probes. Peak extra memory: CPU resident-set "
        "high-water mark above the RSS before the call (fresh process, after a warm-up call); CUDA "
        "`torch.cuda.max_memory_allocated` above the allocation before the call.",
        "",
    ]


# ------------------------------------------------------------------------------------ stability experiments
def experiments(folder: Path) -> List[dict]:
    """The results.json of every experiment under ``folder`` that ran the stability estimator, with
    its path, label and date (the file's, else its last commit's)."""
    out = []
    for path in sorted(folder.glob("*/results.json")):
        d = json.loads(path.read_text())
        if "csl_seconds" not in d.get("stability", {}):
            continue
        cfg, st = d["config"], d["stability"]
        noise = cfg.get("stability_noise") or 0.0
        data = f"{noise:.0%} noise" if noise else "clean labels"
        d["label"] = f"{cfg['dataset']} {cfg['subset']}, {data}, K={st['k']}"
        d["path"] = str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)
        d["date"] = (
            d.get("date")
            or subprocess.run(
                ["git", "log", "-1", "--format=%cs", "--", str(path)],
                cwd=ROOT,
                capture_output=True,
                text=True,
            ).stdout.strip()
            or "uncommitted"
        )
        out.append(d)
    return out


def constant_top(agreement: dict) -> bool:
    """True where the estimate is the same on every top-k sample: CSL's Pearson there is undefined (NaN)."""
    pc = [v for k, v in agreement["csl"].items() if k.startswith("PC top")]
    return bool(pc) and all(v != v for v in pc)


def stability(exps: Sequence[dict]) -> List[str]:
    out = ["## CSL vs the stability (Feldman–Zhang) estimator: compute and agreement", ""]
    for d in exps:
        st, cfg = d["stability"], d["config"]
        per_model = st["stability_seconds"] / st["k"]
        cost = pd.DataFrame(
            [
                {
                    "K (models)": st["k"],
                    "plain run (s)": fmt(st.get("plain_seconds")),
                    "CSL run (s)": fmt(st["csl_seconds"]),
                    "every score (s)": fmt(st["tracked_seconds"]),
                    "stability, K models (s)": fmt(st["stability_seconds"]),
                    "per model (s)": fmt(per_model),
                    "measured ratio": f"{st['stability_seconds'] / st['csl_seconds']:.1f}x",
                    **{f"ratio at K={k}": f"{k * per_model / st['csl_seconds']:,.0f}x" for k in (2000, 4000)},
                }
            ]
        )
        agree = pd.DataFrame(st["agreement"]).T.map(lambda v: "n/a" if v != v else f"{v:.3f}")
        if constant_top(st["agreement"]):
            for c in [c for c in agree if c.startswith("CS top")]:
                agree[c] = agree[c] + " †"
        agree.insert(0, "score", agree.index)
        out += [
            f"### {d['label']}",
            "",
            f"- Source: `{d['path']}` ({d['date']}, CPU), produced by `{d['command']}`",
            f"- Model {cfg['model']}, {cfg['train']['epochs']} epochs, batch {cfg['train']['batch_size']}, lr "
            f"{cfg['train']['lr']}, weight decay {cfg['train']['weight_decay']}",
            "",
            markdown(cost),
            "",
            markdown(
                agree.rename(
                    columns=lambda c: (
                        c.replace("CS ", "cosine, ").replace("PC ", "Pearson, ").replace("SC ", "Spearman, ")
                    )
                )
            ),
            "",
        ]
        if "reliability" in st:
            rel = st["reliability"]
            out += [
                f"Fit: the tracked model classifies {st['train_accuracy']:.1%} of its training samples as "
                "labelled; "
                f"the stability models {st['stability_p_in']:.1%} of those they trained on. Split-half reliability "
                f"of the K-model estimate (Spearman–Brown): {rel:.3f}, so no score can correlate with it above "
                f"√{rel:.3f} = {rel**0.5:.3f}.",
                "",
            ]
    return out + [
        "Ratios: the stability estimator's compute (time per model, each trained on 70 % of the data, times "
        "K) over the CSL run's (a training run with `memcore.accumulate` as its loss). Top-k: the k samples "
        "the stability estimate ranks as most memorized (the CSL paper's CIFAR-100 figures: cosine on "
        "the top-k 0.93, Pearson on all 0.79). n/a: undefined where one side is constant. †: the "
        "estimate is 1.0 on every top-k sample, so a cosine there measures only how even the scores are "
        "and cannot fail; no verdict is given on it.",
        "",
    ]


# ------------------------------------------------------------------------------------ goals
def figures(df: pd.DataFrame, exps: Sequence[dict]) -> pd.DataFrame:
    """Every figure a goal can be judged by: figure, device, machine, case, value (NaN: n/a), reason, where."""
    out = []

    def add(figure, rows, case, value, reason="", where="", device=None, machine=None):
        out.append(
            dict(
                figure=figure,
                device=device or rows.device.iloc[0],
                machine=machine or rows.machine.iloc[0],
                case=case,
                value=value,
                reason=reason,
                at=f"{where}{', ' if where else ''}{meta(rows)['date']}",
            )
        )

    ce = df[(df.suite == "cross_entropy") & (df.case == "loss") & (df.metric == "median_ms")]
    copy = df[(df.case == "d2d_copy")]
    for (shape, dtype, _device), g in ce.groupby(["shape", "dtype", "device"]):
        m = g.set_index("variant").value
        for fig, a, b in (
            ("memcore / plain", "memcore", "plain"),
            ("eager / memcore", "eager", "memcore"),
            ("memcore / liger", "memcore", "liger"),
        ):
            if a in m and b in m:
                add(fig, g, f"{shape} {dtype}", m[a] / m[b], where=f"{shape} {dtype}")
    for device, g in ce[ce.variant == "memcore"].groupby("device"):
        big = g.loc[g["shape"].map(lambda s: math.prod(map(int, s.split("x")))).idxmax()]
        cp = copy[(copy.device == device)].pivot_table(
            index="shape", columns="metric", values="value", aggfunc="first"
        )
        if len(cp) and big["dtype"] in ELEMENT_BYTES:
            n, c = map(int, big["shape"].split("x"))
            eff = (
                3 * n * c * ELEMENT_BYTES[big["dtype"]] / (big.value * 1e-3)
            )  # fwd reads, bwd reads + writes
            gbs = cp.bytes_moved.iloc[0] / (cp.median_ms.iloc[0] * 1e-3)
            add(
                "% of copy bandwidth",
                g[g["shape"] == big["shape"]],
                f"{big['shape']} {big['dtype']}",
                100 * eff / gbs,
                where=f"{big['shape']} {big['dtype']}",
            )
    st = df[(df.suite == "training_step") & (df.metric == "interleaved_ratio")]
    for (case, shape, dtype, _device, variant), g in st.groupby(
        ["case", "shape", "dtype", "device", "variant"]
    ):
        add(
            f"step overhead {variant}",
            g,
            f"{case} {shape} {dtype}",
            100 * (g.value.iloc[0] - 1),
            where=f"{case} {shape} {dtype}",
        )
    lin = df[df.suite == "linear_cross_entropy"]
    for (shape, dtype, device), g in lin.groupby(["shape", "dtype", "device"]):
        if shape not in LINEAR_SHAPES.get(device, ()):
            continue
        t, m = (g[g.metric == k].set_index("variant").value for k in ("median_ms", "peak_mib"))
        where = f"{shape} {dtype}"
        if {"linear", "plain"} <= set(t.index):
            add("linear / plain time", g, where, t["linear"] / t["plain"], where=where)
        if {"linear", "plain"} <= set(m.index):
            add("linear / plain peak", g, where, 100 * m["linear"] / m["plain"], where=where)
        if {"linear", "liger"} <= set(t.index):
            add("linear / liger time", g, where, t["linear"] / t["liger"], where=where)
        if "linear" in m.index:
            add("linear peak", g, where, m["linear"] / 1024, where=where)
    sh = df[df.suite == "shard"]
    for _, r in sh[
        (sh.case == "state") & (sh.variant == "dense") & (sh.metric == "bytes_per_sample")
    ].iterrows():
        add(
            "state bytes per sample",
            sh[sh.case == "state"],
            r.variant,
            r.value,
            where=f"{int(r['shape']):,} samples",
        )
    for (case, shape), g in sh[sh.case.str.startswith("step") & (sh.metric == "interleaved_ratio")].groupby(
        ["case", "shape"]
    ):
        add(
            "routing overhead",
            g,
            f"{shape}, {case}",
            100 * (g.value.iloc[0] - 1),
            where="no confidence interval: see the section",
        )
    sass = df[df.suite == "sass"]  # static: rows per arch (device sm_XX), judged as CUDA goals
    for (case, arch), g in sass[(sass.metric == "instr_per_elem") & (sass.dtype == "bfloat16")].groupby(
        ["case", "device"]
    ):
        add(
            f"sass {case} instr/elem",
            g,
            arch,
            g.value.max(),
            where=arch,
            device="cuda",
            machine=f"{arch} SASS, static",
        )
    for arch, g in sass[sass.metric == "spill_bytes"].groupby("device"):
        add(
            "sass spill bytes",
            g,
            arch,
            g.value.max(),
            where=f"{arch}, {g.case.nunique()} kernels",
            device="cuda",
            machine=f"{arch} SASS, static",
        )
    cv = df[df.suite == "curvature"]
    for _device, g in cv.groupby("device"):
        best = g[(g.case == "10 probes") & (g.metric == "best_s")].set_index("variant").value
        if {"memcore", "reference"} <= set(best.index):
            add(
                "curvature speedup",
                g,
                "small_cnn",
                best["reference"] / best["memcore"],
                where=g["shape"].iloc[0],
            )
        for _, r in g[g.metric == "spearman_vs_reference"].iterrows():
            add("curvature spearman", g, "small_cnn", r.value, where=f"{g['shape'].iloc[0]}, {r.case}")
    for d in exps:
        st, rows = (
            d["stability"],
            pd.DataFrame(
                [dict(device="cpu", machine="machine not recorded", date=d["date"], commit="", dirty="0")]
            ),
        )
        agree = st["agreement"]["csl"]
        add(
            "stability cost ratio K=2000",
            rows,
            d["label"],
            2000 * st["stability_seconds"] / st["k"] / st["csl_seconds"],
        )
        for key, v in agree.items():
            if key.startswith("CS top"):
                why = (
                    "n/a: the estimate is 1.0 on every top-k sample, so a cosine there cannot fail"
                    if constant_top(st["agreement"])
                    else ""
                )
                add("cosine top-k", rows, d["label"], math.nan if why else v, why, key.replace("CS ", ""))
            elif key == "PC all":
                add("pearson all", rows, d["label"], v)
            elif re.match(r"(SC|overlap) top", key):  # rank agreement on the top-k (a set where it varies)
                add(
                    "rank agreement top-k",
                    rows,
                    d["label"],
                    v,
                    "n/a: undefined (constant)" if v != v else "",
                    key.replace("SC ", "Spearman, "),
                )
    return pd.DataFrame(out, columns=["figure", "device", "machine", "case", "value", "reason", "at"])


def verdict(text: str, op: str, threshold: float) -> str:
    shown = float(re.sub(r"[^0-9.+-]", "", text))  # judged as printed
    return "✓" if (shown <= threshold if op == "<=" else shown >= threshold) else "✗"


def goals_table(figs: pd.DataFrame) -> List[str]:
    rows = []
    for g in GOALS:
        sel = figs[(figs.figure == g.figure) & (figs.device == g.device)]
        if sel.empty:
            rows.append([g.wording, g.issue, g.device, f"not measured: `{g.command}`", "", "—"])
            continue
        if g.per == "worst":
            ok = sel.dropna(subset=["value"])
            worst = ok.loc[ok.value.idxmax() if g.op == "<=" else ok.value.idxmin()]
            span = f"{g.fmt.format(ok.value.min())}–{g.fmt.format(ok.value.max())}" if len(ok) > 1 else ""
            text = g.fmt.format(worst.value)
            rows.append(
                [
                    g.wording,
                    g.issue,
                    f"{g.device} ({worst.machine})",
                    f"{text} worst ({span})" if span else text,
                    "; ".join(ok["at"]),
                    verdict(text, g.op, g.threshold),
                ]
            )
            continue
        for _, f in sel.iterrows():
            text = f.reason if f.value != f.value else g.fmt.format(f.value)
            rows.append(
                [
                    f"{g.wording} ({f.case})",
                    g.issue,
                    f"{g.device} ({f.machine})",
                    text,
                    f["at"],
                    "—" if f.value != f.value else verdict(text, g.op, g.threshold),
                ]
            )
    table = pd.DataFrame(rows, columns=["goal", "issue", "device", "measured", "shapes, date", "verdict"])
    counts = table.verdict.value_counts()
    return [
        "## Goals at a glance",
        "",
        f"{counts.get('✓', 0)} met, {counts.get('✗', 0)} missed, {counts.get('—', 0)} not measured or n/a. "
        "A verdict is given only on the figure its goal is judged by, taken as printed; the sections below hold "
        "the details.",
        "",
        markdown(table),
        "",
    ]


# ------------------------------------------------------------------------------------ main
def render(df: pd.DataFrame, exps: Sequence[dict], left_out: int = 0, allow_dirty: bool = False) -> str:
    head = [
        "# memcore benchmark results",
        "",
        "Generated by `python -m benchmarks.render` from `benchmarks/results.csv` (one row per measured figure, "
        "appended by `bash scripts/bench.sh` and `python -m benchmarks.test_bench_curvature --write`) and the "
        "stability experiments' `results/*/results.json`. Do not edit by hand. The commit column names the "
        "code each figure was measured on; `+dirty`: a working tree with changes, `unrecorded`: measured before "
        "commits were recorded.",
        "",
    ]
    if allow_dirty and ((df.dirty != "0").any()):
        head += [
            "**Includes figures measured on modified or unrecorded working trees** (rendered with "
            "`--allow-dirty`); re-measure on a clean checkout to replace them.",
            "",
        ]
    if left_out:
        head += [
            f"{left_out} stored figures from modified or unrecorded working trees are left out "
            "(`--allow-dirty` publishes them, marked).",
            "",
        ]
    body = (
        goals_table(figures(df, exps))
        + cross_entropy(df)
        + training_step(df)
        + scaling(df)
        + linear_ce(df)
        + shard(df)
        + sass(df)
        + curvature(df)
    )
    return "\n".join(head + body + (stability(exps) if exps else [])).rstrip("\n") + "\n"


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--store", type=Path, default=STORE)
    ap.add_argument("--results", type=Path, default=ROOT / "results", help="experiments' folder")
    ap.add_argument("-o", "--output", type=Path, default=OUT)
    ap.add_argument(
        "--allow-dirty",
        action="store_true",
        help="publish figures measured on modified (or unrecorded) working trees, marked as such",
    )
    args = ap.parse_args(argv)
    df, left_out = load(args.store, args.allow_dirty)
    if left_out:
        print(
            f"[memcore] left out {left_out} figures from modified or unrecorded trees (--allow-dirty to "
            "publish them)",
            file=sys.stderr,
        )
    exps = experiments(args.results) if args.results.is_dir() else []
    args.output.write_text(render(df, exps, left_out, args.allow_dirty))
    if df.case.str.startswith("loss vs").any():
        plot(df, args.output.parent / "scaling.png")
    print(f"[memcore] wrote {args.output}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
