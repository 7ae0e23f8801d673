"""Evaluation pieces on scikit-learn's digits: stability estimator, baselines, experiment command."""

import json
import math
import os

import pytest
import torch

import memcore
from memcore.data import IndexedDataset
from memcore.eval import baselines
from memcore.eval.corruptions import inject_label_noise
from memcore.eval.datasets import load_digits
from memcore.eval.metrics import auroc, cosine, pearson, spearman, split_half_reliability, top_k_overlap
from memcore.eval.models import make_model, mlp
from memcore.eval.stability import stability
from memcore.eval.training import TrainConfig, train


def _small(n=300, rate=0.2, seed=0):
    base = load_digits()
    keep = torch.randperm(len(base), generator=torch.Generator().manual_seed(seed))[:n]
    ds = IndexedDataset(base.x[keep], base.y[keep], num_classes=10, name="digits-small")
    return inject_label_noise(ds, rate, seed=seed)


CFG = TrainConfig(epochs=15, batch_size=32, lr=0.05, progress=False, device="cpu")
MEMORIZE = TrainConfig(epochs=40, batch_size=32, lr=0.1, weight_decay=0.0, progress=False, device="cpu")


def _model():
    return make_model("mlp", (1, 8, 8), 10)


@pytest.mark.slow
def test_stability_flags_flipped_labels_and_resumes(tmp_path):
    ds, flipped = _small()
    ck = str(tmp_path / "stab.pt")
    first = stability(ds, _model, k=2, cfg=MEMORIZE, checkpoint=ck, progress=False)
    assert int(first["models"]) == 2
    res = stability(ds, _model, k=4, cfg=MEMORIZE, checkpoint=ck, progress=False)  # resumes: 2 more
    fresh = stability(ds, _model, k=4, cfg=MEMORIZE, progress=False)
    assert int(res["models"]) == 4
    torch.testing.assert_close(res["memorization"], fresh["memorization"], equal_nan=True)
    mem = res["memorization"]
    both = ~torch.isnan(mem)
    assert both.sum() > 0.6 * len(ds)  # held out at least once in 4 draws of 70%
    assert mem[flipped & both].mean() > mem[~flipped & both].mean() + 0.3
    with pytest.raises(ValueError, match="checkpoint"):
        stability(ds, _model, k=6, subset=0.5, cfg=MEMORIZE, checkpoint=ck, progress=False)
    with pytest.raises(ValueError, match="checkpoint"):  # another recipe: its models are not mixed in
        stability(
            ds,
            _model,
            k=6,
            cfg=TrainConfig(**{**MEMORIZE.__dict__, "epochs": 41}),
            checkpoint=ck,
            progress=False,
        )
    with pytest.raises(ValueError, match="checkpoint"):
        stability(ds, lambda: mlp((1, 8, 8), 10, width=64), k=6, cfg=MEMORIZE, checkpoint=ck, progress=False)
    # halves: models 0, 2 and models 1, 3; their counts add up to the whole estimate's
    halves = res["memorization_halves"]
    assert halves.shape == (2, len(ds)) and halves.dtype == torch.float64
    torch.testing.assert_close(halves, fresh["memorization_halves"], equal_nan=True)
    torch.testing.assert_close(halves[1], _mem_of_models(ds, [1, 3]), equal_nan=True)


def _mem_of_models(ds, models):
    """Memorization from the listed models of a seed-0 run alone, each trained as stability() does."""
    from memcore.eval.training import predict

    n = len(ds)
    c = {k: torch.zeros(n, dtype=torch.float64) for k in ("ic", "it", "oc", "ot")}
    for m in models:
        g = torch.Generator().manual_seed(m)
        chosen = torch.randperm(n, generator=g)[: int(round(0.7 * n))]
        inside = torch.zeros(n, dtype=torch.bool)
        inside[chosen] = True
        torch.manual_seed(m)
        model = train(
            _model(),
            ds,
            TrainConfig(**{**MEMORIZE.__dict__, "seed": m, "progress": False}),
            indices=chosen.tolist(),
        )
        correct = (predict(model, ds).argmax(1) == ds.y).double()
        c["ic"] += correct * inside
        c["it"] += inside.double()
        c["oc"] += correct * ~inside
        c["ot"] += (~inside).double()
    return c["ic"] / c["it"] - c["oc"] / c["ot"]


@pytest.mark.slow
def test_stability_resumes_a_checkpoint_without_halves(tmp_path):
    """A checkpoint written before the odd-model counts were kept still resumes; it has no halves."""
    ds, _ = _small(n=120)
    ck = str(tmp_path / "old.pt")
    stability(ds, _model, k=1, cfg=MEMORIZE, checkpoint=ck, progress=False)
    saved = torch.load(ck, weights_only=True)
    saved["state"] = {k: v for k, v in saved["state"].items() if not k.startswith("odd_")}
    torch.save(saved, ck)
    res = stability(ds, _model, k=2, cfg=MEMORIZE, checkpoint=ck, progress=False)
    fresh = stability(ds, _model, k=2, cfg=MEMORIZE, progress=False)
    assert int(res["models"]) == 2 and "memorization_halves" not in res
    torch.testing.assert_close(res["memorization"], fresh["memorization"], equal_nan=True)


class _Marker:
    """A pickled callable that would leave a file behind if it ever ran."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_stability_refuses_a_checkpoint_holding_a_callable(tmp_path):
    """The checkpoint is read with weights_only=True: a pickled callable in it is refused, not run."""
    ds, _ = _small(n=60)
    ck = str(tmp_path / "evil.pt")
    marker = tmp_path / "ran"
    torch.save({"meta": _Marker(str(marker)), "state": {}}, ck)
    with pytest.raises(ValueError, match="refused"):
        stability(ds, _model, k=1, cfg=MEMORIZE, checkpoint=ck, progress=False)
    assert not marker.exists()


def test_every_baseline_gives_one_finite_score_per_sample():
    ds, flipped = _small(n=200)
    tracker = memcore.Tracker(len(ds))
    cfg = TrainConfig(**{**CFG.__dict__, "record_input_grads": True})
    model = train(_model(), ds, cfg, tracker=tracker)
    scores = {"final_loss": baselines.final_loss(model, ds), **baselines.from_tracker(tracker.scores())}
    scores["ssft"] = baselines.ssft(ds, _model, TrainConfig(**{**CFG.__dict__, "epochs": 3}))
    cl = baselines.confident_learning(ds, _model, TrainConfig(**{**CFG.__dict__, "epochs": 3}))
    if cl is not None:
        scores["cl"] = cl
    expected = {
        "final_loss",
        "in_confidence",
        "forgetting",
        "forgetting_events",
        "learning_time",
        "aum",
        "loss_sensitivity",
        "learning_time_formal",
        "ssft",
    }
    assert expected <= set(scores)
    for k, s in scores.items():
        assert s.shape == (len(ds),) and s.dtype == torch.float64, k
        # every sample is seen; forgetting is +inf for the ones never classified correctly
        assert (torch.isfinite(s) | ((s == float("inf")) & (k == "forgetting"))).all(), k
    assert auroc(tracker.scores()["csl"], flipped) > 0.8


def test_metrics():
    a = torch.tensor([1.0, 2.0, 3.0, float("nan")])
    assert cosine(a, a) == pytest.approx(1.0)
    assert pearson(a, -a) == pytest.approx(-1.0)
    # top 2 by the second vector: samples 2 and 1, (5, 0) against (5, 1)
    assert cosine(torch.tensor([1.0, 0.0, 5.0]), torch.tensor([0.0, 1.0, 5.0]), top=2) == pytest.approx(
        25 / 26**0.5 / 5
    )
    assert auroc(torch.tensor([0.1, 0.9, float("nan")]), torch.tensor([False, True, False])) == 1.0
    x = torch.tensor([0.5, 3.0, 1.0, 9.0, 2.0])
    assert spearman(x, x.exp()) == pytest.approx(1.0)  # ranks only: any increasing map
    assert spearman(x, -(x**3)) == pytest.approx(-1.0)
    assert spearman(torch.tensor([1.0, 1.0, 2.0]), torch.tensor([1.0, 2.0, 3.0])) == pytest.approx(0.8660254)


def test_rank_metrics_rank_infinite_scores():
    """A never-learned sample's forgetting is +inf: the rank measures rank it first (NaN is left
    out); cosine and Pearson, which need values, leave both out."""
    inf, nan = float("inf"), float("nan")
    f = torch.tensor([inf, 2.0, 0.0, inf, 1.0, nan])
    truth = torch.tensor([True, False, False, True, False, False])
    assert auroc(f, truth) == 1.0  # inf above every finite score, NaN below
    y = torch.tensor([9.0, 3.0, 1.0, 8.0, 2.0, 0.0])
    assert spearman(f, y) == pytest.approx(0.9746794)  # ranks (4.5, 3, 1, 4.5, 2) vs (5, 3, 1, 4, 2)
    assert top_k_overlap(f, y, 2) == 1.0  # the two infinite entries are y's top 2
    assert pearson(f, y) == pytest.approx(
        pearson(torch.tensor([2.0, 0.0, 1.0]), torch.tensor([3.0, 1.0, 2.0]))
    )


def test_top_k_agreement_is_undefined_where_the_estimate_is_constant():
    """Against an estimate that is constant on its top k, cosine would measure only how even the
    score is there (uniform noise in [1, 2] scores 0.98): the top-k cosine is n/a, the rank overlap
    stays meaningful and sits at chance for a score unrelated to the estimate."""
    g = torch.Generator().manual_seed(0)
    mem = torch.zeros(4000, dtype=torch.float64)
    mem[:400] = 1.0  # 400 samples at the estimate's maximum
    noise = 1.0 + torch.rand(4000, generator=g, dtype=torch.float64)
    assert math.isnan(cosine(noise, mem, top=400))
    assert math.isnan(pearson(noise, mem, top=400)) and math.isnan(spearman(noise, mem, top=400))
    assert top_k_overlap(noise, mem, 400) == pytest.approx(0.1, abs=0.04)  # chance: 400 / 4000
    assert top_k_overlap(mem + noise / 10, mem, 400) == 1.0
    # ties at the k-th value count as broken at random: 2 of the 4 tied samples make the top 2
    b = torch.tensor([1.0, 1.0, 1.0, 1.0, 0.0, 0.0])
    assert top_k_overlap(torch.tensor([6.0, 5.0, 0.0, 0.0, 1.0, 2.0]), b, 2) == pytest.approx(0.5)
    assert top_k_overlap(torch.tensor([0.0, 0.0, 0.0, 0.0, 2.0, 1.0]), b, 2) == 0.0
    x = torch.tensor([3.0, 1.0, 2.0, 5.0])
    assert top_k_overlap(x, x, 2) == 1.0 and top_k_overlap(x, -x, 2) == 0.0
    from memcore.eval.experiment import agreement_rows

    rows, facts = agreement_rows({"csl": noise}, mem, 400)
    assert facts["estimate_constant"] and facts["overlap_chance"] == pytest.approx(0.1)
    assert math.isnan(rows["csl"]["CS top 400"]) and rows["csl"]["overlap top 400"] < 0.2
    rows, facts = agreement_rows({"csl": noise}, mem + noise, 400)  # an estimate that varies: defined
    assert not facts["estimate_constant"] and rows["csl"]["SC top 400"] > 0.9


def test_split_half_reliability():
    g = torch.Generator().manual_seed(0)
    truth = torch.randn(20000, generator=g, dtype=torch.float64)
    a = truth + torch.randn(20000, generator=g, dtype=torch.float64)  # each half: r = 1/2 with the other
    b = truth + torch.randn(20000, generator=g, dtype=torch.float64)
    assert split_half_reliability(a, b) == pytest.approx(2 * 0.5 / 1.5, abs=0.02)
    assert split_half_reliability(truth, truth) == pytest.approx(1.0)
    assert split_half_reliability(a, -b) == 0.0  # anti-correlated halves: no signal
    assert math.isnan(split_half_reliability(torch.full((3,), float("nan")), a[:3]))  # nothing to compare
    # the full estimate (a + b) / 2 correlates with a fresh one made the same way as predicted
    c, d = (truth + torch.randn(20000, generator=g, dtype=torch.float64) for _ in range(2))
    assert pearson((a + b) / 2, (c + d) / 2) == pytest.approx(split_half_reliability(a, b), abs=0.02)


@pytest.mark.slow
def test_experiment_command_end_to_end(tmp_path):
    out = str(tmp_path / "exp")
    from memcore.__main__ import main

    code = main(
        [
            "experiment",
            "--dataset",
            "digits",
            "--subset",
            "300",
            "--noise",
            "0.1",
            "--duplicates",
            "10",
            "--stability-k",
            "4",
            "--epochs",
            "3",
            "--batch-size",
            "64",
            "--out",
            out,
            "--no-progress",
        ]
    )
    assert code == 0
    for f in (
        "results.md",
        "results.json",
        "mislabel_auroc.csv",
        "duplicate_auroc.csv",
        "stability_agreement.csv",
        "roc_mislabel.png",
        "top_csl.png",
    ):
        assert os.path.getsize(os.path.join(out, f)) > 0, f
    md = open(os.path.join(out, "results.md")).read()
    with open(os.path.join(out, "results.json")) as f:
        st = json.load(f)["stability"]
    for key in ("plain_seconds", "csl_seconds", "tracked_seconds", "stability_seconds"):
        assert st[key] > 0, key
    assert 0.0 <= st["train_accuracy"] <= 1.0 and 0.0 <= st["stability_p_in"] <= 1.0
    assert 0.0 <= st["reliability"] <= 1.0  # 2 models a half: small, but a number
    assert set(st["agreement"]["csl"]) == {
        "CS top 30",
        "PC top 30",
        "SC top 30",
        "overlap top 30",
        "CS all",
        "PC all",
        "SC all",
    }
    assert st["top_k"] == 30 and 0.0 < st["top_k_overlap_chance"] <= 1.0
    assert isinstance(st["top_k_estimate_constant"], bool)
    assert "Split-half reliability" in md
    assert "| CSL |" in md and "Mislabel detection" in md and "python -m memcore experiment" in md
    with open(os.path.join(out, "roc_mislabel.png"), "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_auroc_equals_scikit_learn_with_ties():
    roc_auc_score = pytest.importorskip("sklearn.metrics").roc_auc_score
    g = torch.Generator().manual_seed(0)
    for n in (2, 7, 100, 1001):
        score = torch.randint(0, 5, (n,), generator=g).double()  # many ties
        truth = torch.arange(n) % 3 == 0
        truth[0], truth[1] = True, False  # both classes present
        want = roc_auc_score(truth.numpy(), score.numpy())
        assert auroc(score, truth) == pytest.approx(want, rel=1e-12, abs=1e-12)
    with pytest.raises(ValueError, match="positive and negative samples"):
        auroc(torch.ones(3), torch.ones(3, dtype=torch.bool))
