"""The papers' experiments on real data, from one command:

    python -m memcore experiment --dataset mnist --subset 4000 --noise 0.01,0.02,0.05,0.1

(output in a fresh ``runs/<dataset>-<UTC time>`` unless ``--out DIR``)

1. mislabel detection: for each noise rate, one tracked training run on the noisy labels, then the
   AUROC of every score for the flipped samples (CSL paper Table 2);
2. duplicate detection: k images inserted again with another label, AUROC for the copies;
3. agreement with stability memorization: one tracked run on the clean (or --stability-noise)
   data against the Feldman–Zhang estimator with K models; cosine similarity, Pearson and
   Spearman correlation on all samples and on the top k by the estimate (CSL paper Table 1; the
   top-k figures are n/a when the estimate is constant there, where they cannot measure
   agreement), the overlap of the top k by score and by estimate, the split-half reliability of
   the estimate, and the compute of each (a plain run, a CSL run, the K models).
Tables are printed and saved as CSV, Markdown and results.json before the PNGs (ROC curves and the
highest-CSL images) are drawn. Every training run's per-sample scores are written with its
corruption flags: ``scores_noise_<rate>.csv`` (``flipped``, ``original_label``),
``scores_duplicates.csv`` (``duplicate``), ``scores_stability.csv`` (``stability``: the estimate), or
Parquet with ``--scores-format parquet``.
"""

import argparse
import json
import os
import platform
import shlex
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import torch
from torch.utils.data import DataLoader

from .. import export
from ..data import IndexedDataset
from ..tracker import Tracker
from . import MissingExtraError, _args, baselines, require_extra
from . import datasets as mdata
from .corruptions import inject_duplicates, inject_label_noise
from .metrics import auroc, cosine, pearson, spearman, split_half_reliability, top_k_overlap
from .models import MODELS, make_model
from .stability import stability
from .training import TrainConfig, predict, train

DATASETS = ("digits", "mnist", "cifar10", "cifar100")

# display name, key; "higher = more suspicious" orientation is applied in `all_scores`
METHODS = [
    ("CSL", "csl"),
    ("Curvature", "curvature"),
    ("Loss sensitivity", "loss_sensitivity"),
    ("Final loss", "final_loss"),
    ("Forgetting freq.", "forgetting"),
    ("Forgetting events", "forgetting_events"),
    ("In-confidence", "in_confidence"),
    ("AUM", "aum"),
    ("Learning time (epoch)", "learning_time"),
    ("Learning time (formal)", "learning_time_formal"),
    ("SSFT", "ssft"),
    ("Confident learning", "cl"),
]


@dataclass
class ExperimentConfig:
    dataset: str = "digits"
    data_dir: Optional[str] = None
    subset: Optional[int] = None
    model: str = "mlp"
    noise: List[float] = field(default_factory=lambda: [0.01, 0.02, 0.05, 0.1])
    duplicates: int = 0
    stability_k: int = 0
    stability_noise: float = 0.0  # label noise of the data the agreement experiment runs on
    top_k: Optional[int] = None  # top-k for agreement; default 10% of the data
    train: TrainConfig = field(default_factory=TrainConfig)
    curvature: bool = False
    curvature_every: int = 1
    curvature_probes: int = 10
    ssft: bool = False
    cl: bool = False
    out: Optional[str] = None  # None: a fresh runs/<dataset>-<UTC time>
    scores_format: str = "csv"  # every run's per-sample scores: "csv" or "parquet" (export extra)
    seed: int = 0


def default_out(dataset: str) -> str:
    """A fresh output directory, never one of the committed results/ folders."""
    return os.path.join("runs", f"{dataset}-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}")


def _check(cfg: ExperimentConfig) -> None:
    """The config's ranges, checked before any training (the CLI checks them per flag already)."""
    for name, value, low in (
        ("subset", cfg.subset, 1),
        ("top_k", cfg.top_k, 1),
        ("duplicates", cfg.duplicates, 0),
        ("stability_k", cfg.stability_k, 0),
        ("curvature_every", cfg.curvature_every, 1),
        ("curvature_probes", cfg.curvature_probes, 1),
        ("train.epochs", cfg.train.epochs, 1),
        ("train.batch_size", cfg.train.batch_size, 1),
    ):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < low):
            raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    for name, value in [("stability_noise", cfg.stability_noise)] + [("noise", r) for r in cfg.noise]:
        if not 0.0 <= value < 1.0:
            raise ValueError(f"{name} must be in [0, 1), got {value!r}")
    if cfg.model not in MODELS:
        raise ValueError(f"model must be one of {sorted(MODELS)}, got {cfg.model!r}")
    if cfg.scores_format not in ("csv", "parquet"):
        raise ValueError(f"scores_format must be 'csv' or 'parquet', got {cfg.scores_format!r}")


def load(cfg: ExperimentConfig) -> IndexedDataset:
    if cfg.dataset == "digits":
        ds = mdata.load_digits()
    elif cfg.dataset == "mnist":
        root = cfg.data_dir or mdata.default_mnist_dir()
        if root is None:
            raise FileNotFoundError(
                "MNIST not found: pass --data-dir DIR with the idx .gz files (or set MEMCORE_MNIST_DIR)"
            )
        ds = mdata.load_mnist(root, "train")
    elif cfg.dataset in ("cifar", "cifar10", "cifar100"):
        if not cfg.data_dir:
            raise FileNotFoundError("CIFAR needs --data-dir DIR with the python-pickle batches")
        ds = mdata.load_cifar(cfg.data_dir, "train")
    else:
        raise ValueError(f"unknown dataset {cfg.dataset!r}: digits, mnist, cifar10, cifar100")
    if cfg.subset is not None and cfg.subset < len(ds):
        keep = (
            torch.randperm(len(ds), generator=torch.Generator().manual_seed(cfg.seed))[: cfg.subset]
            .sort()
            .values
        )
        ds = IndexedDataset(
            ds.x[keep], ds.y[keep], num_classes=ds.num_classes, name=f"{ds.name}[{cfg.subset}]"
        )
    return ds


def tracked_run(ds: IndexedDataset, cfg: ExperimentConfig, desc: str):
    """One training run with memcore tracking (and curvature at epoch ends if asked)."""
    torch.manual_seed(cfg.seed)
    model = make_model(cfg.model, ds.x.shape[1:], ds.num_classes)
    tracker = Tracker(len(ds))
    curv = None
    hook = None
    if cfg.curvature:
        from ..curvature import CurvatureTracker

        curv = CurvatureTracker(len(ds), n_probes=cfg.curvature_probes, seed=cfg.seed, progress=False)
        loader = DataLoader(ds, batch_size=256, shuffle=False)

        def hook(epoch: int, m: torch.nn.Module) -> None:
            if (epoch + 1) % cfg.curvature_every == 0 or epoch + 1 == cfg.train.epochs:
                t = time.perf_counter()
                curv.update(m, loader)
                curv_seconds[0] += time.perf_counter() - t

    curv_seconds = [0.0]
    tcfg = TrainConfig(**{**cfg.train.__dict__, "record_input_grads": True})
    t0 = time.perf_counter()
    train(model, ds, tcfg, tracker=tracker, on_epoch_end=hook, desc=desc)
    seconds = time.perf_counter() - t0 - curv_seconds[0]  # the training run CSL comes with
    scores = tracker.scores()
    if curv is not None:
        scores["curvature"] = curv.scores()["curvature"]
    return model, scores, seconds


def timing_runs(ds: IndexedDataset, cfg: ExperimentConfig) -> Tuple[float, float]:
    """Seconds of one training run with plain F.cross_entropy and of one with memcore.accumulate
    (no input gradients): what CSL costs next to the training a user runs anyway."""
    out = []
    for tracker in (None, Tracker(len(ds))):
        torch.manual_seed(cfg.seed)
        model = make_model(cfg.model, ds.x.shape[1:], ds.num_classes)
        tcfg = TrainConfig(**{**cfg.train.__dict__, "record_input_grads": False, "progress": False})
        t0 = time.perf_counter()
        train(model, ds, tcfg, tracker=tracker)
        out.append(time.perf_counter() - t0)
    return out[0], out[1]


def all_scores(model, ds, scores: Dict[str, torch.Tensor], cfg: ExperimentConfig) -> Dict[str, torch.Tensor]:
    """Every method's score for one run, oriented higher = more suspicious."""
    out = {"csl": scores["csl"], "final_loss": baselines.final_loss(model, ds)}
    out.update(baselines.from_tracker(scores))
    if "curvature" in scores:
        out["curvature"] = scores["curvature"]
    model_fn = lambda: make_model(cfg.model, ds.x.shape[1:], ds.num_classes)  # noqa: E731
    quiet = TrainConfig(**{**cfg.train.__dict__, "progress": False})
    if cfg.ssft:
        out["ssft"] = baselines.ssft(ds, model_fn, quiet, seed=cfg.seed)
    if cfg.cl:
        cl = baselines.confident_learning(ds, model_fn, quiet, seed=cfg.seed)
        if cl is not None:
            out["cl"] = cl
    return out


def _table(rows: Dict[str, Dict[str, float]], cols: List[str], fmt: str = "{:.4f}") -> List[List[str]]:
    """Rows in METHODS order; a missing or NaN value is shown as n/a."""

    def cell(v: Optional[float]) -> str:
        return "n/a" if v is None or v != v else fmt.format(v)

    out = [["Method"] + cols]
    for name, key in METHODS:
        if key in rows:
            out.append([name] + [cell(rows[key].get(c)) for c in cols])
    return out


def _markdown(table: List[List[str]]) -> str:
    lines = ["| " + " | ".join(table[0]) + " |", "|" + "---|" * len(table[0])]
    lines += ["| " + " | ".join(r) + " |" for r in table[1:]]
    return "\n".join(lines)


def _csv(table: List[List[str]], path: str) -> None:
    with open(path, "w") as f:
        f.write("\n".join(",".join(r) for r in table) + "\n")


def write_scores(
    out: str, run: str, scores: Dict[str, torch.Tensor], ds: IndexedDataset, fmt: str, **flags
) -> str:
    """Every sample's scores of one training run, with its label and the run's corruption flags
    (``flipped`` / ``duplicate`` 0 or 1, ``original_label``, ...), to ``<out>/scores_<run>.csv``, or
    with ``fmt="parquet"`` to ``<out>/scores_<run>/scores.parquet``; returns the path."""
    columns = {**scores, **{k: torch.as_tensor(v).long() for k, v in flags.items()}}
    if fmt == "parquet":
        return export.to_parquet({"label": ds.y, **columns}, os.path.join(out, f"scores_{run}"))
    path = os.path.join(out, f"scores_{run}.csv")
    export.to_csv(columns, path, labels=ds.y)
    return path


def run(cfg: ExperimentConfig, argv: Optional[List[str]] = None) -> Dict[str, object]:
    """Runs the configured experiments, prints and saves the tables, results.json and then the
    plots into ``cfg.out`` (default: a fresh ``runs/<dataset>-<UTC time>``); returns the numbers.

    Raises ImportError naming the ``eval`` extra before any training when one of its packages is
    missing, ValueError for a config out of range.
    """
    require_extra(("sklearn", "tqdm", "matplotlib"))
    _check(cfg)
    if cfg.scores_format == "parquet":
        try:
            export._pyarrow()
        except ImportError as e:
            raise MissingExtraError(str(e)) from e
    base = load(cfg)
    out = cfg.out or default_out(cfg.dataset)
    os.makedirs(out, exist_ok=True)
    data_name = base.name
    print(
        f"memcore experiment: {base.name}, {len(base)} samples, {base.num_classes} classes, model {cfg.model}, "
        f"{cfg.train.epochs} epochs, device {cfg.train.torch_device()}, output in {out}"
    )
    results: Dict[str, object] = {
        "config": {**_jsonable(cfg), "out": out},
        "command": "python -m memcore " + shlex.join(argv or ["experiment"]),
    }
    sections = []
    figures = []  # (function, args): drawn after the tables and results.json are on disk
    written = []  # the per-sample scores files

    # 1. mislabeled samples
    if cfg.noise:
        aurocs: Dict[str, Dict[str, float]] = {}
        curves = {}
        for rate in cfg.noise:
            noisy, flipped = inject_label_noise(base, rate, seed=cfg.seed)
            model, scores, _ = tracked_run(noisy, cfg, desc=f"noise {rate:.0%}")
            written.append(
                write_scores(
                    out,
                    f"noise_{rate:g}",
                    scores,
                    noisy,
                    cfg.scores_format,
                    flipped=flipped,
                    original_label=base.y,
                )
            )
            methods = all_scores(model, noisy, scores, cfg)
            col = f"{rate:.0%} noise"
            for k, s in methods.items():
                aurocs.setdefault(k, {})[col] = auroc(s, flipped)
            curves[col] = (methods, flipped)
            if rate == max(cfg.noise):
                pred = predict(model, noisy).argmax(1)
                figures.append(
                    ("top_images", (noisy, scores["csl"], pred, flipped, os.path.join(out, "top_csl.png")))
                )
        cols = [f"{r:.0%} noise" for r in cfg.noise]
        t = _table(aurocs, cols)
        _csv(t, os.path.join(out, "mislabel_auroc.csv"))
        sections.append("## Mislabel detection (AUROC)\n\n" + _markdown(t))
        figures.append(
            (
                "roc_curves",
                (curves, [n for n, _ in METHODS], dict(METHODS), os.path.join(out, "roc_mislabel.png")),
            )
        )
        results["mislabel_auroc"] = aurocs
        print("\n" + sections[-1])

    # 2. duplicates with another label
    if cfg.duplicates:
        dup, is_dup = inject_duplicates(base, cfg.duplicates, seed=cfg.seed)
        model, scores, _ = tracked_run(dup, cfg, desc="duplicates")
        written.append(write_scores(out, "duplicates", scores, dup, cfg.scores_format, duplicate=is_dup))
        methods = all_scores(model, dup, scores, cfg)
        rows = {k: {"AUROC": auroc(s, is_dup)} for k, s in methods.items()}
        t = _table(rows, ["AUROC"])
        _csv(t, os.path.join(out, "duplicate_auroc.csv"))
        sections.append(
            f"## Duplicate detection ({cfg.duplicates} copies with another label)\n\n" + _markdown(t)
        )
        results["duplicate_auroc"] = {k: v["AUROC"] for k, v in rows.items()}
        print("\n" + sections[-1])

    # 3. agreement with stability memorization
    if cfg.stability_k:
        clean_y = base.y
        flags = {}
        if cfg.stability_noise > 0:
            base, stab_flipped = inject_label_noise(base, cfg.stability_noise, seed=cfg.seed)
            flags = {"flipped": stab_flipped, "original_label": clean_y}
        model, scores, full_s = tracked_run(base, cfg, desc="stability-data run")
        plain_s, csl_s = timing_runs(base, cfg)
        fit = float((predict(model, base).argmax(1) == base.y).double().mean())
        methods = all_scores(model, base, scores, cfg)
        model_fn = lambda: make_model(cfg.model, base.x.shape[1:], base.num_classes)  # noqa: E731
        stab = stability(
            base,
            model_fn,
            k=cfg.stability_k,
            cfg=TrainConfig(**{**cfg.train.__dict__, "progress": False}),
            seed=cfg.seed,
            checkpoint=os.path.join(out, "stability.pt"),
            progress=cfg.train.progress,
        )
        mem = stab["memorization"]
        columns = {**scores, "stability": mem}
        written.append(write_scores(out, "stability", columns, base, cfg.scores_format, **flags))
        halves = stab.get("memorization_halves")
        rel = split_half_reliability(halves[0], halves[1]) if halves is not None else float("nan")
        top = cfg.top_k or max(10, len(base) // 10)
        agreement, top_set = agreement_rows(methods, mem, top)
        t = _table(agreement, list(next(iter(agreement.values())).keys()))
        _csv(t, os.path.join(out, "stability_agreement.csv"))
        stab_s = float(stab["seconds"])
        per_model = stab_s / cfg.stability_k
        p_in = float(stab["p_in"].nanmean())
        lo, hi = top_set["estimate_min"], top_set["estimate_max"]
        top_note = (
            f"Top {top}: the {top} samples with the highest stability estimate, which ranges from "
            f"{lo:.3f} to {hi:.3f} on them. "
            + (
                "The estimate is constant there, so cosine, Pearson and Spearman on the top "
                f"{top} cannot measure agreement and are n/a; judge by the overlap and the "
                "all-sample figures. "
                if top_set["estimate_constant"]
                else ""
            )
            + f"Overlap: the fraction of a score's top {top} among the estimate's top {top} (ties "
            f"broken at random); chance {top_set['overlap_chance']:.3f}."
        )
        cost = (
            f"Compute: one training run with plain F.cross_entropy {plain_s:.1f} s; with memcore.accumulate "
            f"(CSL and the loss statistics) {csl_s:.1f} s; with every tracker score (input gradients "
            f"too) {full_s:.1f} s. Stability estimator, K={cfg.stability_k} models: {stab_s:.1f} s "
            f"({per_model:.2f} s a model, {stab_s / csl_s:.1f}x the CSL run); at the published K=2000-4000, "
            f"about {2000 * per_model / csl_s:,.0f}x-{4000 * per_model / csl_s:,.0f}x.\n\n"
            f"Fit: the tracked model classifies {fit:.1%} of its training samples as labelled; the "
            f"stability models {p_in:.1%} of the samples they trained on (mean P(correct | in)). "
            f"Split-half reliability of the stability estimate (even vs odd models, Spearman-Brown): "
            f"{rel:.3f}; no score can reach a Pearson correlation above its square root, {rel**0.5:.3f}."
        )
        on = f"{cfg.stability_noise:.0%} label noise" if cfg.stability_noise > 0 else "the clean labels"
        sections.append(
            f"## Agreement with stability memorization (K={cfg.stability_k}, subsets of 70%, on {on})\n\n"
            + _markdown(t)
            + "\n\n"
            + top_note
            + "\n\n"
            + cost
        )
        torch.save(
            {"memorization": mem, "memorization_halves": halves, "scores": methods},
            os.path.join(out, "stability_scores.pt"),
        )
        results["stability"] = {
            "agreement": agreement,
            "top_k": top,
            **{f"top_k_{k}": v for k, v in top_set.items()},
            "k": cfg.stability_k,
            "stability_seconds": stab_s,
            "plain_seconds": plain_s,
            "csl_seconds": csl_s,
            "tracked_seconds": full_s,
            "train_accuracy": fit,
            "stability_p_in": p_in,
            "reliability": rel,
        }
        print("\n" + sections[-1])

    header = (
        f"# memcore experiment results\n\nCommand: `{results['command']}`\n\n"
        f"Data: {data_name}, {len(base)} samples; model {cfg.model}; {cfg.train.epochs} epochs, "
        f"batch {cfg.train.batch_size}, lr {cfg.train.lr}, weight decay {cfg.train.weight_decay}; "
        f"seed {cfg.seed}.\n"
        f"Machine: {platform.platform()}, {os.cpu_count()} cores, torch {torch.__version__}, "
        f"device {cfg.train.torch_device()}; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}.\n"
    )
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write(header + "\n" + "\n\n".join(sections) + "\n")
    results["scores_files"] = written
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(results, f, indent=1, default=float)
    print(f"\nwrote {out}/results.md, results.json and the CSV tables")
    if written:
        print(f"wrote every sample's scores and corruption flags: {', '.join(written)}")
    if figures:
        from . import plots

        for name, args in figures:
            getattr(plots, name)(*args)
        print(f"wrote {', '.join(os.path.basename(a[-1]) for _, a in figures)} to {out}")
    return results


def agreement_rows(
    methods: Dict[str, torch.Tensor], mem: torch.Tensor, top: int
) -> Tuple[Dict[str, Dict[str, float]], Dict[str, object]]:
    """Agreement of every method's score with the stability estimate ``mem`` [N].

    Per method: cosine ("CS"), Pearson ("PC"), Spearman ("SC") on the ``top`` samples with the
    highest estimate and on all samples, and "overlap top k" (fraction of the method's top k among
    the estimate's top k). The top-k CS/PC/SC are NaN where the estimate is constant on its top k
    (they would measure only how even the score is there). Also returns facts about that set:
    estimate_min / estimate_max / estimate_constant, and overlap_chance = k / N (finite N).
    """
    finite = torch.isfinite(mem)
    k = min(top, int(finite.sum()))
    top_vals = torch.sort(mem[finite], descending=True).values[:k].double()
    lo, hi = (float(top_vals.min()), float(top_vals.max())) if k else (float("nan"), float("nan"))
    constant = not k or lo == hi
    rows = {}
    for name, s in methods.items():
        rows[name] = {
            f"CS top {top}": float("nan") if constant else cosine(s, mem, top=top),
            f"PC top {top}": float("nan") if constant else pearson(s, mem, top=top),
            f"SC top {top}": float("nan") if constant else spearman(s, mem, top=top),
            f"overlap top {top}": top_k_overlap(s, mem, top),
            "CS all": cosine(s, mem),
            "PC all": pearson(s, mem),
            "SC all": spearman(s, mem),
        }
    facts = {
        "estimate_min": lo,
        "estimate_max": hi,
        "estimate_constant": constant,
        "overlap_chance": k / max(int(finite.sum()), 1),
    }
    return rows, facts


def _jsonable(cfg: ExperimentConfig) -> Dict[str, object]:
    d = dict(cfg.__dict__)
    d["train"] = dict(cfg.train.__dict__)
    return d


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The flags of ``python -m memcore experiment``; each one's range is checked by argparse."""
    g = p.add_argument_group("data")
    g.add_argument(
        "--dataset",
        default="digits",
        choices=DATASETS,
        help="digits is bundled with scikit-learn; the others are read from --data-dir",
    )
    g.add_argument(
        "--data-dir",
        default=None,
        help="MNIST idx files / CIFAR python-pickle batches (default for MNIST: $MEMCORE_MNIST_DIR, "
        "else shared/data/mnist beside the repository; CIFAR needs it)",
    )
    g.add_argument(
        "--subset",
        type=_args.positive_int,
        default=None,
        help="train on a random subset of this many samples (default: all)",
    )
    g.add_argument(
        "--noise",
        type=_args.rates,
        default="0.01,0.02,0.05,0.1",
        help="comma-separated label-noise rates in [0, 1), one mislabel run each ('' for none)",
    )
    g.add_argument(
        "--duplicates",
        type=_args.nonnegative_int,
        default=0,
        help="duplicates with another label to insert for the duplicate run (0: skip)",
    )
    g = p.add_argument_group("stability agreement")
    g.add_argument(
        "--stability-k",
        type=_args.nonnegative_int,
        default=0,
        help="models of the Feldman-Zhang stability estimator (0: skip the experiment)",
    )
    g.add_argument(
        "--stability-noise",
        type=_args.rate,
        default=0.0,
        help="label noise of the data the agreement experiment runs on",
    )
    g.add_argument(
        "--top-k",
        type=_args.positive_int,
        default=None,
        help="size of the top-k set of the agreement tables (default: 10%% of the data, at least 10)",
    )
    g = p.add_argument_group("training")
    g.add_argument(
        "--model", default="mlp", choices=sorted(MODELS), help="reference model (memcore.eval.models)"
    )
    g.add_argument("--epochs", type=_args.positive_int, default=20, help="epochs of every training run")
    g.add_argument("--batch-size", type=_args.positive_int, default=128, help="SGD batch size")
    g.add_argument("--lr", type=_args.positive_float, default=0.05, help="peak learning rate (cosine decay)")
    g.add_argument("--weight-decay", type=_args.nonnegative_float, default=5e-4, help="SGD weight decay")
    g.add_argument(
        "--device",
        type=_args.device,
        default=None,
        help="cpu, cuda, cuda:1, ... (default: cuda when available)",
    )
    g.add_argument(
        "--seed", type=_args.nonnegative_int, default=0, help="seed of data, noise, models and order"
    )
    g = p.add_argument_group("extra methods")
    g.add_argument("--curvature", action="store_true", help="also score input-loss curvature at epoch ends")
    g.add_argument(
        "--curvature-every",
        type=_args.positive_int,
        default=1,
        help="score curvature every this many epochs (and after the last)",
    )
    g.add_argument(
        "--curvature-probes", type=_args.positive_int, default=10, help="Rademacher probes per score"
    )
    g.add_argument("--ssft", action="store_true", help="second-split forgetting time (4 extra trainings)")
    g.add_argument("--cl", action="store_true", help="confident learning via cleanlab (2 extra trainings)")
    g = p.add_argument_group("output")
    g.add_argument(
        "--out",
        default=None,
        help="output directory (default: a fresh runs/<dataset>-<UTC time>, so no run overwrites the committed results/)",
    )
    g.add_argument(
        "--scores-format",
        default="csv",
        choices=("csv", "parquet"),
        help="every run's per-sample scores with its corruption flags: scores_<run>.csv, or "
        "scores_<run>/scores.parquet (needs pyarrow: the export extra)",
    )
    g.add_argument("--no-progress", action="store_true", help="no progress bars")


def from_args(args: argparse.Namespace) -> ExperimentConfig:
    return ExperimentConfig(
        dataset=args.dataset,
        data_dir=args.data_dir,
        subset=args.subset,
        model=args.model,
        noise=list(args.noise),
        duplicates=args.duplicates,
        stability_k=args.stability_k,
        stability_noise=args.stability_noise,
        top_k=args.top_k,
        train=TrainConfig(
            epochs=args.epochs,
            batch_size=args.batch_size,
            lr=args.lr,
            weight_decay=args.weight_decay,
            seed=args.seed,
            device=args.device,
            progress=not args.no_progress,
        ),
        curvature=args.curvature,
        curvature_every=args.curvature_every,
        curvature_probes=args.curvature_probes,
        ssft=args.ssft,
        cl=args.cl,
        out=args.out,
        scores_format=args.scores_format,
        seed=args.seed,
    )
