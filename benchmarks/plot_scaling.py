"""Plots the loss-scaling benchmarks (test_bench_scaling.py) from pytest-benchmark JSON.

    python benchmarks/plot_scaling.py /tmp/bench_scaling.json [more.json ...] [-o benchmarks/scaling.png]

Left: median forward + backward time vs the number of classes C (N fixed per device), log-log,
one line per variant and device. Right: the same vs the number of rows N (C fixed). Where CUDA
peak memory was recorded, a third panel shows it vs C. Several files are merged; where two hold
the same case, the later one wins. benchmarks/report.py calls this too (next to its output).
"""
import argparse
import json
import os
import sys
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib import ticker  # noqa: E402

DEFAULT_OUTPUT = Path(__file__).resolve().parent / "scaling.png"
VARIANT_STYLE = {  # colour per variant, line style per device
    "plain": "tab:gray", "eager": "tab:orange", "memcore": "tab:blue", "memcore_overwrite": "tab:cyan",
    "liger": "tab:green",
}
DEVICE_STYLE = {"cpu": ("-", "o"), "cuda": ("--", "s")}

Series = Dict[Tuple[str, str, str], Dict[int, float]]  # (variant, device, dtype) -> {x: value}


def load(paths: Iterable[os.PathLike]) -> List[dict]:
    docs = []
    for path in paths:
        with open(path) as f:
            docs.append(json.load(f))
    return docs


def series(docs: Sequence[dict], sweep: str, value: str = "time") -> Tuple[Series, Dict[str, int]]:
    """({(variant, device, dtype): {x: ms or MiB}}, {device: the fixed other dimension}) of one
    sweep ("C": x = C; "N": x = N) from the benchmarks with kernel "scaling"."""
    out: Series = {}
    fixed: Dict[str, int] = {}
    for doc in docs:
        for bench in doc.get("benchmarks", []):
            info = bench.get("extra_info") or {}
            if info.get("kernel") != "scaling" or sweep not in (info.get("sweeps") or []):
                continue
            n, c = int(info["n"]), int(info["c"])
            if value == "time":
                y = 1e3 * float(bench["stats"]["median"])
            else:
                y = info.get("peak_mem_mb")
                if y is None:
                    continue
            device = str(info["device"])
            out.setdefault((str(info["variant"]), device, str(info["dtype"])), {})[c if sweep == "C" else n] = float(y)
            fixed[device] = n if sweep == "C" else c
    return out, fixed


def _draw(ax, data: Series, xlabel: str, ylabel: str, title: str) -> None:
    order = list(VARIANT_STYLE)
    for (variant, device, dtype) in sorted(data, key=lambda k: (k[1], order.index(k[0]) if k[0] in order else 9, k)):
        pts = sorted(data[(variant, device, dtype)].items())
        ls, marker = DEVICE_STYLE.get(device.split(":")[0], (":", "^"))
        ax.plot([p[0] for p in pts], [p[1] for p in pts], linestyle=ls, marker=marker, markersize=4,
                color=VARIANT_STYLE.get(variant, "tab:purple"), label=f"{variant} ({device}, {dtype})")
    ax.set_xscale("log")
    ax.set_yscale("log")
    xs = sorted({x for pts in data.values() for x in pts})
    if xs:  # label the measured sizes themselves, as plain integers
        ax.set_xticks(xs)
        ax.xaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:,.0f}"))
        ax.xaxis.set_minor_formatter(ticker.NullFormatter())
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    if data:
        ax.legend(fontsize=8)
    else:
        ax.text(0.5, 0.5, "no data", transform=ax.transAxes, ha="center", va="center")


def _fixed_text(fixed: Dict[str, int], name: str) -> str:
    return ", ".join(f"{name} = {v} ({d})" for d, v in sorted(fixed.items())) or "no data"


def plot(docs: Sequence[dict], output: os.PathLike = DEFAULT_OUTPUT, title: Optional[str] = None) -> Path:
    """Writes the PNG and returns its path."""
    by_c, n_fixed = series(docs, "C")
    by_n, c_fixed = series(docs, "N")
    mem, mem_fixed = series(docs, "C", value="peak")
    panels = 3 if mem else 2
    fig, axes = plt.subplots(1, panels, figsize=(6.2 * panels, 4.8))
    _draw(axes[0], by_c, "classes C", "forward + backward (ms)", f"time vs C ({_fixed_text(n_fixed, 'N')})")
    _draw(axes[1], by_n, "rows N", "forward + backward (ms)", f"time vs N ({_fixed_text(c_fixed, 'C')})")
    if mem:
        _draw(axes[2], mem, "classes C", "peak memory above inputs (MiB)",
              f"CUDA peak memory vs C ({_fixed_text(mem_fixed, 'N')})")
    fig.suptitle(title or "memcore.accumulate vs plain / eager cross-entropy: scaling (median of rounds)")
    fig.tight_layout()
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(output, dpi=110)
    plt.close(fig)
    return output


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("json", nargs="+", help="pytest-benchmark JSON file(s) with test_bench_scaling.py results")
    ap.add_argument("-o", "--output", default=str(DEFAULT_OUTPUT), help="PNG to write")
    args = ap.parse_args(argv)
    docs = load(args.json)
    if not series(docs, "C")[0] and not series(docs, "N")[0]:
        print("no scaling benchmarks in the input", file=sys.stderr)
        return 1
    print(f"wrote {plot(docs, args.output)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
