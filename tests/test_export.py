import csv
import math

import numpy as np
import pytest
import torch
from reference import trained_tracker

import memcore
from memcore import export


def _scores():
    tr = memcore.Tracker(5)
    logits = torch.tensor([[3.0, 0.0], [0.0, 3.0], [1.0, 0.0], [0.0, 0.5], [2.0, 0.0]])
    memcore.accumulate(logits[:4], torch.tensor([0, 0, 0, 1]), torch.arange(4), tr)
    tr.end_epoch()
    return tr.scores()  # sample 4 never seen


def test_ranked_issues_and_quality():
    s = _scores()
    order = export.ranked_issues(s, by="csl")
    assert order[0] == 1 and order[-1] == 4  # worst loss first, unseen last
    assert list(export.ranked_issues(s, by="aum", top=2)) == [1, 3]  # low margin = suspicious
    assert len(export.ranked_issues(s, fraction=0.4)) == 2
    with pytest.raises(ValueError, match="fraction"):
        export.ranked_issues(s, fraction=1.5)
    with pytest.raises(TypeError, match="fraction"):
        export.ranked_issues(s, fraction="0.4")
    q = export.label_quality_scores(s)
    assert q[1] == 0.0 and q[4] == 1.0 and ((q >= 0) & (q <= 1)).all()
    with pytest.raises(KeyError, match="nope"):
        export.ranked_issues(s, by="nope")


def test_csv_and_dataframe(tmp_path):
    s = _scores()
    path = tmp_path / "scores.csv"
    export.to_csv(s, str(path), labels=torch.tensor([0, 0, 0, 1, 0]))
    lines = path.read_text().splitlines()
    assert lines[0].startswith("index,label,csl,") and len(lines) == 6
    assert float(lines[2].split(",")[2]) == pytest.approx(float(s["csl"][1]))
    pd = pytest.importorskip("pandas")
    df = export.to_dataframe(s)
    assert list(df["index"]) == [0, 1, 2, 3, 4] and np.allclose(df["csl"], s["csl"].numpy())
    assert isinstance(df, pd.DataFrame)


def _tracker_with_open_epoch(n=23):
    g = torch.Generator().manual_seed(4)
    tr = memcore.Tracker(n)
    for e in range(3):
        for _ in range(3):
            idx = torch.randint(0, n - 1, (8,), generator=g)  # id n-1 never seen
            memcore.accumulate(
                torch.randn(8, 3, generator=g), torch.randint(0, 3, (8,), generator=g), idx, tr
            )
        if e < 2:
            tr.end_epoch()
    return tr


def test_parquet_streams_row_groups_and_round_trips(tmp_path):
    pq = pytest.importorskip("pyarrow.parquet")
    tr = _tracker_with_open_epoch()
    want = tr.scores()
    path = export.to_parquet(tr, str(tmp_path / "out"), row_group_size=5)  # 23 rows: 5 row groups
    meta = pq.ParquetFile(path).metadata
    assert meta.num_row_groups == 5 and meta.num_rows == 23
    table = pq.read_table(path)
    assert table.column_names == ["index"] + list(memcore.SCORE_NAMES)
    assert str(table.schema.field("index").type) == "int64"
    got = export.read_parquet(str(tmp_path / "out"))
    assert torch.equal(got["index"], torch.arange(23))
    for k in want:
        assert torch.equal(got[k].nan_to_num(-7), want[k].nan_to_num(-7)), k
    assert tr.epochs == 2  # writing did not close the open epoch
    # a dict of scores (e.g. one shard's, with its ids) streams the same way
    shard = {"index": torch.arange(100, 110), "csl": torch.arange(10.0)}
    export.to_parquet(shard, str(tmp_path / "d"), row_group_size=4)
    back = export.read_parquet(str(tmp_path / "d"))
    assert torch.equal(back["index"], shard["index"]) and torch.equal(back["csl"], shard["csl"].double())
    with pytest.raises(ValueError, match="rows"):
        export.to_parquet({"a": torch.zeros(3), "b": torch.zeros(4)}, str(tmp_path / "bad"))


def test_parquet_without_pyarrow_names_the_extra(tmp_path, monkeypatch):
    import builtins

    real = builtins.__import__

    def no_pyarrow(name, *a, **k):
        if name.startswith("pyarrow"):
            raise ImportError("No module named 'pyarrow'")
        return real(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_pyarrow)
    with pytest.raises(ImportError, match=r"memcore\[export\]"):
        export.to_parquet({"csl": torch.zeros(2)}, str(tmp_path))


def test_join_scores_onto_hf_dataset_by_index(tmp_path):
    datasets = pytest.importorskip("datasets")
    pytest.importorskip("pyarrow")
    tr = _tracker_with_open_epoch(10)
    s = tr.scores()
    ds = datasets.Dataset.from_dict({"text": [f"t{i}" for i in range(10)], "sid": [9 - i for i in range(10)]})
    by_row = export.join_scores(ds, s)
    assert by_row["csl"] == s["csl"].tolist() and by_row["text"][3] == "t3"
    export.to_parquet(tr, str(tmp_path / "p"))
    by_id = export.join_scores(ds, str(tmp_path / "p"), index_column="sid", prefix="mc_")
    assert by_id["mc_csl"] == s["csl"].flip(0).tolist()
    assert np.isnan(by_id["mc_csl_mean"][0])  # id 9 was never seen


def test_to_csv_checks_lengths_before_writing(tmp_path):
    sc = trained_tracker().scores()
    path = tmp_path / "s.csv"
    with pytest.raises(ValueError, match="labels"):
        export.to_csv(sc, str(path), labels=torch.arange(5))
    assert not path.exists()
    with pytest.raises(ValueError, match="different lengths"):
        export.to_csv({"a": torch.zeros(3), "b": torch.zeros(4)}, str(path))
    assert not path.exists()
    export.to_csv(sc, str(path), labels=torch.arange(12))
    assert len(path.read_text().splitlines()) == 13


def test_ranked_issues_refuses_negative_top():
    sc = trained_tracker().scores()
    with pytest.raises(ValueError, match="top"):
        export.ranked_issues(sc, top=-1)
    for bad in (2.5, True):
        with pytest.raises(TypeError, match="top"):
            export.ranked_issues(sc, top=bad)
    assert len(export.ranked_issues(sc, top=0)) == 0 and len(export.ranked_issues(sc, top=np.int64(3))) == 3


def test_infinite_forgetting_survives_every_export(tmp_path):
    """A never-learned sample's forgetting (+inf) is written and read back as inf by CSV (csv and
    pandas), the DataFrame, Parquet and the Hugging Face join; unseen samples stay NaN."""
    s = _scores()  # sample 1 (label 0, logits favour 1) is never right, sample 4 is unseen
    inf = float("inf")
    assert s["forgetting"][1] == inf and torch.isnan(s["forgetting"][4])
    path = tmp_path / "scores.csv"
    export.to_csv(s, str(path))
    with open(path) as f:
        rows = list(csv.DictReader(f))
    assert float(rows[1]["forgetting"]) == inf and math.isnan(float(rows[4]["forgetting"]))
    pd = pytest.importorskip("pandas")
    for df in (pd.read_csv(path), export.to_dataframe(s)):
        assert np.isposinf(df["forgetting"][1]) and np.isnan(df["forgetting"][4])
    pytest.importorskip("pyarrow")
    export.to_parquet(s, str(tmp_path / "pq"))
    back = export.read_parquet(str(tmp_path / "pq"))
    assert back["forgetting"][1] == inf and torch.isnan(back["forgetting"][4])
    datasets = pytest.importorskip("datasets")
    joined = export.join_scores(datasets.Dataset.from_dict({"x": list(range(5))}), str(tmp_path / "pq"))
    assert joined["forgetting"][1] == inf
