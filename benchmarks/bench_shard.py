"""The shard suite: the tracker's state per sample, and the sharded tracker at dataset scale, on this
machine's CPU with gloo ranks.

    python benchmarks/bench_shard.py bytes                 # bytes per sample, dense and sharded
    python benchmarks/bench_shard.py scale N [--world 2] [--no-scores]
                                        # N-sample sharded tracker: memory per rank, end_epoch(),
                                        # to_parquet(), scores() times
    python benchmarks/bench_shard.py step [--world 2]      # routing overhead per training step,
                                                           # sharded vs unsharded, interleaved

Prints one JSON line per measurement; with --store (benchmarks/results.csv) also appends the figures
to the benchmark store as suite "shard" rows (case "state": bytes_per_sample per layout; "scale":
per-rank state, peak RSS, end_epoch / to_parquet times, worst rank and fastest; "step, W gloo
ranks": interleaved step medians and the sharded / unsharded ratio), which benchmarks/render.py
turns into RESULTS.md. MEMCORE_BENCH_NOTE or --note is stored as each row's note. Under pytest (the
benchmark smoke run) only the bytes measurement runs, unstored.
"""

import argparse
import datetime
import json
import os
import resource
import statistics
import sys
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import memcore  # noqa: E402
from benchmarks import store  # noqa: E402
from benchmarks.curvature_reference import small_cnn  # noqa: E402  (the model its rows name)
from benchmarks.goals import Goal, value  # noqa: E402
from memcore import export  # noqa: E402

TITLE = "Dataset scale: compact and sharded tracker state"
BY_CASE = True
NOTES = """
*state*: `Tracker.state_bytes()` per sample (what `state_dict()` holds) per layout; sharded, each rank
holds as much per sample for ceil(N / world) samples. *scale*: `python benchmarks/bench_shard.py scale N
--no-scores`, an N-sample sharded tracker over gloo ranks: state per rank, peak RSS after `end_epoch()`
and after `to_parquet()` (the largest rank), times of the slowest rank (_min: the fastest), the Parquet
file per rank. *step*: `python benchmarks/bench_shard.py step`, a small CNN under DDP on every rank (both
variants sync gradients every step), 128-row batches, a flush every 64 steps; a round runs both variants
back to back (alternating order); medians over rounds of the mean step time, interleaved_ratio sharded
over unsharded. No confidence interval is recorded: on a loaded machine a few percent is within its noise.
"""
GOALS = [
    Goal("tracker state ≤ 64 bytes per sample (no input gradients; per rank: / world when sharded)", "cpu",
         value("bytes_per_sample", label="{variant}, {shape} samples", case="state", variant="dense"),
         "<=", 64.0, "{:.1f} B", "python benchmarks/bench_shard.py bytes --store benchmarks/results.csv"),
    Goal("sharded routing ≤ 1 % of a training step (interleaved)", "cpu",
         value("interleaved_ratio", 100, 1, "{case}, {shape}", variant="sharded"), "<=", 1.0, "{:+.1f} %",
         "python benchmarks/bench_shard.py step --world 2 --store benchmarks/results.csv (on a quiet machine)"),
]  # fmt: skip


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _init(rank, world, init_file):
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"file://{init_file}",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(minutes=10),
    )


def _rows(case, variant, shape, figures, units, **kw):
    """Store rows of one measurement: ``figures`` metric -> value."""
    common = dict(
        suite="shard",
        case=case,
        variant=variant,
        shape=shape,
        device="cpu",
        machine=store.machine(),
        date=store.now(),
        torch=torch.__version__,
        **kw,
    )
    return [store.row(**common, metric=m, value=v, unit=units.get(m, "")) for m, v in figures.items()]


def bytes_per_sample() -> list:
    n = 100_000
    tr = memcore.Tracker(n)
    out = _rows("state", "dense", n, {"bytes_per_sample": tr.state_bytes() / n}, {"bytes_per_sample": "B"})
    print(json.dumps({"what": "dense bytes/sample (no input grads)", "value": tr.state_bytes() / n}))
    for tau in (0.5, None):
        tr = memcore.Tracker(n, tau=tau)
        x = torch.randn(8, 4, requires_grad=True)
        memcore.accumulate(
            x @ torch.randn(4, 3), torch.zeros(8, dtype=torch.long), torch.arange(8), tr, inputs=x
        ).backward()
        tr.end_epoch()
        print(
            json.dumps(
                {
                    "what": f"dense bytes/sample with input grads, tau={tau}, after 1 epoch",
                    "value": tr.state_bytes() / n,
                }
            )
        )
        out += _rows(
            "state",
            f"dense, input grads, tau={tau}, 1 epoch",
            n,
            {"bytes_per_sample": tr.state_bytes() / n},
            {"bytes_per_sample": "B"},
        )
    sd = memcore.Tracker(n).state_dict()
    size = sum(v.numel() * v.element_size() for v in sd["buffers"].values())
    print(json.dumps({"what": "state_dict tensors bytes/sample", "value": size / n}))
    return out


def _scale_worker(rank, world, init_file, n, out_dir, with_scores, rec_dir):
    _init(rank, world, init_file)
    base = _rss_mb()
    tr = memcore.Tracker(n, device="cpu", shard=True)
    held = tr.state_bytes()
    g = torch.Generator().manual_seed(rank)
    t0 = time.perf_counter()
    steps = 64
    for _ in range(steps):  # one flush worth of random rows (1024 per step per rank)
        idx = torch.randint(0, n, (1024,), generator=g)
        memcore.accumulate(
            torch.randn(1024, 10, generator=g), torch.randint(0, 10, (1024,), generator=g), idx, tr
        )
    t_acc = time.perf_counter() - t0
    peak = {"after_accumulate": _peak_mb()}
    dist.barrier()
    t0 = time.perf_counter()
    tr.end_epoch()
    t_end = time.perf_counter() - t0
    peak["after_end_epoch"] = _peak_mb()
    dist.barrier()
    t0 = time.perf_counter()
    export.to_parquet(tr, out_dir)
    t_pq = time.perf_counter() - t0
    peak["after_to_parquet"] = _peak_mb()
    dist.barrier()
    t_scores = None
    if with_scores:
        t0 = time.perf_counter()
        tr.scores()  # the whole shard's scores as one dict (~100 bytes per sample)
        t_scores = time.perf_counter() - t0
        peak["after_scores"] = _peak_mb()
    dist.barrier()
    rec = {
        "what": "scale",
        "num_samples": n,
        "world": world,
        "rank": rank,
        "state_mb_per_rank": held / 2**20,
        "base_rss_mb": base,
        "peak_rss_mb": peak,
        "accumulate_64_steps_s": t_acc,
        "end_epoch_s": t_end,
        "scores_s": t_scores,
        "to_parquet_s": t_pq,
        "parquet_mb": os.path.getsize(os.path.join(out_dir, f"scores-{rank:05d}-of-{world:05d}.parquet"))
        / 2**20,
    }
    print(json.dumps(rec), flush=True)
    with open(os.path.join(rec_dir, f"scale-{rank}.json"), "w") as f:
        json.dump(rec, f)
    dist.destroy_process_group()


def _scale_rows(recs) -> list:
    """The ranks' records as store rows: the worst rank (which the others wait for) and the fastest."""
    worst = lambda k: max(r[k] for r in recs)  # noqa: E731
    figs = {
        "state_mib_per_rank": worst("state_mb_per_rank"),
        "peak_rss_mib": max(r["peak_rss_mb"]["after_end_epoch"] for r in recs),
        "peak_rss_parquet_mib": max(r["peak_rss_mb"]["after_to_parquet"] for r in recs),
        "end_epoch_s": worst("end_epoch_s"),
        "end_epoch_s_min": min(r["end_epoch_s"] for r in recs),
        "to_parquet_s": worst("to_parquet_s"),
        "to_parquet_s_min": min(r["to_parquet_s"] for r in recs),
        "parquet_mib": worst("parquet_mb"),
    }
    units = {m: "MiB" if m.endswith("mib") or "mib_" in m else "s" for m in figs}
    return _rows("scale", f"{recs[0]['world']} gloo ranks", recs[0]["num_samples"], figs, units, threads=1)


def _step_worker(rank, world, init_file, n, rounds, steps, rec_dir):
    _init(rank, world, init_file)
    torch.manual_seed(0)
    # DDP, as in real training: both variants sync every step, so rank skew is not counted as routing
    model = torch.nn.parallel.DistributedDataParallel(small_cnn())
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    trackers = {
        "unsharded": memcore.Tracker(n, device="cpu", distributed=False),
        "sharded": memcore.Tracker(n, device="cpu", shard=True),
    }
    g = torch.Generator().manual_seed(rank)
    batch = 128
    x = torch.randn(batch, 1, 28, 28, generator=g)
    y = torch.randint(0, 10, (batch,), generator=g)
    times = {k: [] for k in trackers}
    for r in range(rounds):
        for name in ("unsharded", "sharded") if r % 2 == 0 else ("sharded", "unsharded"):
            tr = trackers[name]
            dist.barrier()
            t0 = time.perf_counter()
            for _ in range(steps):  # steps is a multiple of flush_every: every flush is inside the window
                idx = torch.randint(0, n, (batch,), generator=g)
                loss = memcore.accumulate(model(x), y, idx, tr)
                opt.zero_grad()
                loss.backward()
                opt.step()
            times[name].append((time.perf_counter() - t0) / steps * 1e3)
    med = {k: statistics.median(v) for k, v in times.items()}
    if rank == 0:
        rec = {
            "what": "step",
            "world": world,
            "batch": batch,
            "ms_per_step_median": med,
            "overhead_pct": 100 * (med["sharded"] / med["unsharded"] - 1),
            "rounds": rounds,
            "steps_per_round": steps,
        }
        print(json.dumps(rec), flush=True)
        with open(os.path.join(rec_dir, "step-0.json"), "w") as f:
            json.dump(rec, f)
    dist.destroy_process_group()


def _step_rows(rec) -> list:
    """Interleaved medians (ms per step, rank 0) and the sharded / unsharded ratio, as store rows."""
    case, shape = f"step, {rec['world']} gloo ranks", f"small_cnn {rec['batch']}x1x28x28"
    out = []
    for v, ms in rec["ms_per_step_median"].items():
        out += _rows(
            case,
            v,
            shape,
            {"interleaved_median_ms": ms, "interleaved_rounds": rec["rounds"]},
            {"interleaved_median_ms": "ms", "interleaved_rounds": "count"},
            dtype="float32",
            threads=1,
        )
    return out + _rows(
        case,
        "sharded",
        shape,
        {"interleaved_ratio": 1 + rec["overhead_pct"] / 100},
        {"interleaved_ratio": "ratio"},
        dtype="float32",
        threads=1,
    )


def test_bytes_per_sample():
    """The bytes measurement runs and gives one row per layout, dense first."""
    rows = bytes_per_sample()
    assert rows[0]["variant"] == "dense" and all(float(r["value"]) > 0 for r in rows)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("mode", choices=["bytes", "scale", "step"])
    ap.add_argument("n", nargs="?", type=int, default=10_000_000)
    ap.add_argument("--world", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--no-scores", action="store_true", help="scale: skip the whole-shard scores() dict")
    ap.add_argument("--store", default=None, help="append the figures to this CSV (benchmarks/results.csv)")
    ap.add_argument("--note", default=os.environ.get("MEMCORE_BENCH_NOTE", ""), help="the rows' note")
    a = ap.parse_args()
    if a.mode == "bytes":
        rows = bytes_per_sample()
    else:
        with tempfile.TemporaryDirectory() as tmp:
            init = os.path.join(tmp, "init")
            if a.mode == "scale":
                mp.spawn(
                    _scale_worker,
                    args=(a.world, init, a.n, os.path.join(tmp, "pq"), not a.no_scores, tmp),
                    nprocs=a.world,
                    join=True,
                )
                rows = _scale_rows(
                    [json.load(open(os.path.join(tmp, f"scale-{r}.json"))) for r in range(a.world)]
                )
            else:
                mp.spawn(
                    _step_worker, args=(a.world, init, a.n, a.rounds, a.steps, tmp), nprocs=a.world, join=True
                )
                rows = _step_rows(json.load(open(os.path.join(tmp, "step-0.json"))))
    if a.store:
        commit, dirty = store.git_state()
        for r in rows:
            r.update(commit=commit, dirty=dirty, note=a.note)
        n = store.append(rows, a.store)
        tree = ", dirty tree" if dirty != "0" else ""
        print(f"[memcore] stored {n} rows in {a.store} (commit {commit[:9] or '?'}{tree})", file=sys.stderr)


if __name__ == "__main__":
    main()
