"""Evaluation pieces on scikit-learn's digits: stability estimator, baselines, experiment command."""
import os

import pytest
import torch

import memcore
from memcore import baselines, data
from memcore.experiment import ExperimentConfig, run
from memcore.metrics import auroc, cosine, pearson
from memcore.models import make_model
from memcore.stability import stability
from memcore.training import TrainConfig, train


def _small(n=300, rate=0.2, seed=0):
    base = data.load_digits()
    keep = torch.randperm(len(base), generator=torch.Generator().manual_seed(seed))[:n]
    ds = data.IndexedDataset(base.x[keep], base.y[keep], num_classes=10, name="digits-small")
    return data.inject_label_noise(ds, rate, seed=seed)


CFG = TrainConfig(epochs=15, batch_size=32, lr=0.05, progress=False, device="cpu")
MEMORIZE = TrainConfig(epochs=40, batch_size=32, lr=0.1, weight_decay=0.0, progress=False, device="cpu")


def _model():
    return make_model("mlp", (1, 8, 8), 10)


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
    expected = {"final_loss", "in_confidence", "forgetting", "learning_time", "aum", "loss_sensitivity",
                "learning_time_formal", "ssft"}
    assert expected <= set(scores)
    for k, s in scores.items():
        assert s.shape == (len(ds),) and s.dtype == torch.float64, k
        assert torch.isfinite(s).all(), k
    assert auroc(tracker.scores()["csl"], flipped) > 0.8


def test_metrics():
    a = torch.tensor([1.0, 2.0, 3.0, float("nan")])
    assert cosine(a, a) == pytest.approx(1.0)
    assert pearson(a, -a) == pytest.approx(-1.0)
    assert cosine(torch.tensor([1.0, 0.0, 5.0]), torch.tensor([0.0, 1.0, 5.0]), top=1) == pytest.approx(1.0)
    assert auroc(torch.tensor([0.1, 0.9, float("nan")]), torch.tensor([False, True, False])) == 1.0


def test_experiment_command_end_to_end(tmp_path):
    out = str(tmp_path / "exp")
    from memcore.__main__ import main

    code = main([
        "experiment", "--dataset", "digits", "--subset", "300", "--noise", "0.1", "--duplicates", "10",
        "--stability-k", "2", "--epochs", "3", "--batch-size", "64", "--out", out, "--no-progress",
    ])
    assert code == 0
    for f in ("results.md", "results.json", "mislabel_auroc.csv", "duplicate_auroc.csv",
              "stability_agreement.csv", "roc_mislabel.png", "top_csl.png"):
        assert os.path.getsize(os.path.join(out, f)) > 0, f
    md = open(os.path.join(out, "results.md")).read()
    assert "| CSL |" in md and "Mislabel detection" in md and "python -m memcore experiment" in md
    with open(os.path.join(out, "roc_mislabel.png"), "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
