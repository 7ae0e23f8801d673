import numpy as np
import pytest
import torch

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
