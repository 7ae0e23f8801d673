"""`python -m memcore`: help text, flag ranges checked by argparse (errors name the flag), the
demo's CSV, and the experiment's output directory."""

import csv
import os
import re
import subprocess
import sys

import pytest
import torch

import memcore
from memcore.__main__ import main


def _cli(*args, cwd=None):
    root = os.path.dirname(os.path.dirname(os.path.abspath(memcore.__file__)))
    path = os.pathsep.join([root] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])
    return subprocess.run(
        [sys.executable, "-m", "memcore", *args],
        env=dict(os.environ, PYTHONPATH=path),
        cwd=cwd or root,  # `python -m` puts its cwd first on sys.path: the memcore under test is there
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_top_level_help_describes_both_commands(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    assert "demo" in text and "experiment" in text and "scores.csv" in text and "runs/" in text


def test_experiment_help_shows_every_default(capsys):
    with pytest.raises(SystemExit):
        main(["experiment", "--help"])
    text = capsys.readouterr().out
    for flag in ("--subset", "--epochs", "--curvature-every", "--stability-k", "--lr", "--out", "--model"):
        assert flag in text, flag
    assert "(default: 20)" in text and "(default: 0.05)" in text and "{cnn,mlp}" in text
    with pytest.raises(SystemExit):
        main(["demo", "--help"])
    assert "(default: runs/demo)" in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv, flag",
    [
        (["experiment", "--subset", "-5"], "--subset"),
        (["experiment", "--subset", "0"], "--subset"),
        (["experiment", "--curvature-every", "0"], "--curvature-every"),
        (["experiment", "--epochs", "-1"], "--epochs"),
        (["experiment", "--epochs", "2.5"], "--epochs"),
        (["experiment", "--noise", "0.1,1.5"], "--noise"),
        (["experiment", "--stability-noise", "-0.1"], "--stability-noise"),
        (["experiment", "--lr", "0"], "--lr"),
        (["experiment", "--model", "resnet"], "--model"),
        (["experiment", "--dataset", "imagenet"], "--dataset"),
        (["experiment", "--device", "gpu7"], "--device"),
        (["demo", "--noise", "1.0"], "--noise"),
        (["demo", "--top", "0"], "--top"),
        (["demo", "--epochs", "-3"], "--epochs"),
    ],
)
def test_bad_flags_are_refused_by_name(argv, flag, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert f"error: argument {flag}:" in err and "Traceback" not in err, err


@pytest.mark.slow
def test_bad_flag_from_the_command_line_is_one_error_line(tmp_path):
    r = _cli("experiment", "--subset", "-5", cwd=tmp_path)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert (
        r.stderr.strip().splitlines()[-1]
        == "python -m memcore experiment: error: argument --subset: must be an integer >= 1, got '-5'"
    )


def test_missing_data_dir_is_an_error_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["experiment", "--dataset", "cifar10", "--out", str(tmp_path / "o")])
    assert e.value.code == 2 and "error: CIFAR needs --data-dir" in capsys.readouterr().err


@pytest.mark.slow
def test_experiment_writes_to_a_fresh_runs_directory_by_default(tmp_path, monkeypatch):
    from memcore.eval.experiment import ExperimentConfig, default_out, run
    from memcore.eval.training import TrainConfig

    monkeypatch.chdir(tmp_path)
    out = default_out("digits")
    assert out.startswith(os.path.join("runs", "digits-"))
    cfg = ExperimentConfig(
        subset=100, noise=[0.1], duplicates=5, train=TrainConfig(epochs=1, progress=False, device="cpu")
    )
    res = run(cfg)
    written = res["config"]["out"]
    assert written.startswith(os.path.join("runs", "digits-")) and os.path.isfile(
        os.path.join(written, "results.json")
    )
    # every run's per-sample scores with its corruption flags
    noise_csv, dup_csv = (os.path.join(written, f"scores_{run}.csv") for run in ("noise_0.1", "duplicates"))
    assert res["scores_files"] == [noise_csv, dup_csv]
    with open(noise_csv, newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["index", "label", *memcore.SCORE_NAMES, "flipped", "original_label"]
    flipped = [r["flipped"] == "1" for r in rows]
    assert len(rows) == 100 and sum(flipped) == 10
    assert flipped == [r["label"] != r["original_label"] for r in rows]
    with open(dup_csv, newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0])[-1] == "duplicate" and [r["duplicate"] for r in rows] == ["0"] * 100 + ["1"] * 5
    with pytest.raises(ValueError, match="curvature_every"):
        run(ExperimentConfig(curvature_every=0, out=str(tmp_path / "x")))
    assert not (tmp_path / "x").exists()


def test_demo_writes_scores_csv_and_suggests_next_step(tmp_path, capsys):
    """The CSV holds every score (none all-NaN), the flags and the labels: the printed AUROCs follow
    from it, under the names the report prints."""
    import csv
    import math

    from memcore.eval.metrics import auroc
    from memcore.scores import suspicion

    main(["demo", "--epochs", "2", "--no-progress", "--out", str(tmp_path / "demo")])
    out = capsys.readouterr().out
    path = tmp_path / "demo" / "scores.csv"
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    extra = ["flipped", "original_label", "predicted"]
    assert list(rows[0]) == ["index", "label", *memcore.SCORE_NAMES, *extra] and len(rows) == 1797
    cols = {k: torch.tensor([float(r[k]) for r in rows], dtype=torch.float64) for k in rows[0]}
    assert not [k for k, v in cols.items() if torch.isnan(v).all()]
    flipped = cols["flipped"]
    assert set(flipped.tolist()) == {0.0, 1.0} and int(flipped.sum()) == round(0.1 * 1797)
    assert torch.equal(flipped == 1, cols["label"] != cols["original_label"])
    printed = dict(re.findall(r"^  (\w+) +(\d\.\d{4})  \(suspicious when", out, flags=re.M))
    assert set(printed) == set(memcore.SCORE_NAMES) - {"rows"}
    for name, value in printed.items():
        want = auroc(suspicion(name, cols[name]), flipped == 1)
        assert math.isclose(float(value), want, abs_tol=5e-5), name  # printed to 4 decimals
    assert str(path) in out and "Next:" in out


@pytest.mark.slow
def test_experiment_writes_parquet_scores_with_the_flags(tmp_path):
    pytest.importorskip("pyarrow")
    from memcore import export
    from memcore.eval.experiment import ExperimentConfig, run
    from memcore.eval.training import TrainConfig

    cfg = ExperimentConfig(
        subset=60,
        noise=[0.1],
        scores_format="parquet",
        out=str(tmp_path / "run"),
        train=TrainConfig(epochs=1, progress=False, device="cpu"),
    )
    (path,) = run(cfg)["scores_files"]
    assert path == str(tmp_path / "run" / "scores_noise_0.1" / "scores.parquet")
    cols = export.read_parquet(os.path.dirname(path))
    assert set(cols) == {"index", "label", *memcore.SCORE_NAMES, "flipped", "original_label"}
    assert cols["index"].tolist() == list(range(60)) and int(cols["flipped"].sum()) == 6
    assert torch.equal(cols["flipped"] == 1, cols["label"] != cols["original_label"])
