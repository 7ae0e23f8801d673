import csv
import math
import os

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
    # ids in any order come back sorted, each score with its id
    export.to_parquet(
        {"index": torch.tensor([9, 2, 4]), "csl": torch.tensor([0.9, 0.2, 0.4], dtype=torch.float64)},
        str(tmp_path / "u"),
    )
    back = export.read_parquet(str(tmp_path / "u"))
    assert back["index"].tolist() == [2, 4, 9] and back["csl"].tolist() == [0.2, 0.4, 0.9]


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


def test_export_helpers_use_the_scores_sample_ids(tmp_path):
    """A shard's scores (ids 10..19 under "index"): ranked_issues returns those ids, to_csv and
    to_dataframe write them, once, as the index column."""
    s = {k: v[:10] for k, v in _tracker_with_open_epoch(10).scores().items()}
    shard = {"index": torch.arange(10, 20), **s}
    order = export.ranked_issues(s, by="csl")
    assert list(export.ranked_issues(shard, by="csl")) == list(order + 10)
    assert list(export.ranked_issues(shard, by="aum", top=3)) == list(
        export.ranked_issues(s, by="aum", top=3) + 10
    )
    path = tmp_path / "shard.csv"
    export.to_csv(shard, str(path))
    lines = path.read_text().splitlines()
    assert lines[0].split(",").count("index") == 1 and [int(x.split(",")[0]) for x in lines[1:]] == list(
        range(10, 20)
    )
    pytest.importorskip("pandas")
    df = export.to_dataframe(shard)
    assert list(df["index"]) == list(range(10, 20)) and list(df.columns).count("index") == 1
    for bad, match in (
        ({**shard, "index": torch.arange(10.0, 20.0)}, "integer sample ids"),
        ({**shard, "index": torch.tensor([10] * 10)}, "more than once"),
        ({**shard, "index": torch.arange(-1, 9)}, "negative"),
    ):
        with pytest.raises(ValueError, match=match):
            export.ranked_issues(bad)
        with pytest.raises(ValueError, match=match):
            export.to_csv(bad, str(tmp_path / "bad.csv"))
    assert not (tmp_path / "bad.csv").exists()


def test_parquet_re_export_replaces_the_previous_one(tmp_path):
    """A folder holding another export's parts (here a stale part 3 of 4): read_parquet refuses the
    mixed folder, naming the file; a re-export leaves only its own file, other files alone."""
    pytest.importorskip("pyarrow")
    import shutil

    out = tmp_path / "out"
    tr = _tracker_with_open_epoch()
    export.to_parquet(tr, str(out))
    shutil.copy(out / "scores.parquet", out / "scores-00003-of-00004.parquet")
    with pytest.raises(ValueError, match="scores-00003-of-00004.parquet"):
        export.read_parquet(str(out))
    (out / "notes.txt").write_text("kept")
    export.to_parquet(tr, str(out))
    assert sorted(os.listdir(out)) == ["notes.txt", "scores.parquet"]
    got = export.read_parquet(str(out))
    assert torch.equal(got["index"], torch.arange(23))


def test_read_parquet_refuses_foreign_files(tmp_path):
    """A Parquet file memcore did not write (even with an 'index' column), a non-Parquet file named
    .parquet, or a memcore file with a repeated id: ValueError naming the file."""
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    for name, write in (
        ("other.parquet", lambda p: pq.write_table(pa.table({"index": [0, 1], "csl": [0.5, 0.1]}), p)),
        ("bad.parquet", lambda p: open(p, "wb").write(b"not parquet")),
    ):
        folder = tmp_path / name
        export.to_parquet({"csl": torch.zeros(3)}, str(folder))
        write(str(folder / name))
        with pytest.raises(ValueError, match=name):
            export.read_parquet(str(folder))
    with pytest.raises(ValueError, match="more than once"):
        export.to_parquet({"index": torch.tensor([4, 2, 4]), "csl": torch.zeros(3)}, str(tmp_path / "dup"))


def test_join_scores_checks_ids_and_lengths():
    """Ids that are negative, repeated, beyond the dataset or not integers, and columns of another
    length, raise before anything is joined; ids in any order map to their rows."""
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_dict({"text": ["a", "b", "c"], "sid": [7, 3, 5]})
    for scores, match in (
        ({"index": torch.tensor([-1, 0]), "csl": torch.tensor([5.0, 7.0])}, "negative"),
        ({"index": torch.tensor([0, 0]), "csl": torch.tensor([5.0, 7.0])}, "more than once"),
        ({"index": torch.tensor([0, 1, 2]), "csl": torch.tensor([5.0])}, "different lengths"),
        ({"index": torch.tensor([0, 3]), "csl": torch.tensor([5.0, 7.0])}, "beyond the dataset"),
        ({"index": torch.tensor([0.0, 1.0]), "csl": torch.tensor([5.0, 7.0])}, "integer sample ids"),
    ):
        with pytest.raises(ValueError, match=match):
            export.join_scores(ds, scores)
    got = export.join_scores(ds, {"index": torch.tensor([2, 0]), "csl": torch.tensor([5.0, 7.0])})
    assert got["csl"][0] == 7.0 and np.isnan(got["csl"][1]) and got["csl"][2] == 5.0
    by_id = export.join_scores(
        ds, {"index": torch.tensor([5, 7, 9]), "csl": torch.tensor([1.0, 2.0, 3.0])}, index_column="sid"
    )
    assert by_id["csl"][0] == 2.0 and np.isnan(by_id["csl"][1]) and by_id["csl"][2] == 1.0


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
