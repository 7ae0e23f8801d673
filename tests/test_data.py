"""memcore.data (IndexedDataset, with_index), memcore.eval.datasets (digits, MNIST idx, CIFAR pickles) and
memcore.eval.corruptions."""

import gzip
import pickle

import numpy as np
import pytest
import torch

import memcore
from memcore.data import IndexedDataset, with_index
from memcore.eval.corruptions import inject_duplicates, inject_label_noise
from memcore.eval.datasets import default_mnist_dir, load_cifar, load_digits, load_mnist

# ----------------------------------------------------------------------------- helpers


def _write_idx(path, magic, arr, compress):
    arr = np.asarray(arr, dtype=np.uint8)
    header = np.array([magic, *arr.shape], dtype=">i4").tobytes()
    opener = gzip.open if compress else open
    with opener(path, "wb") as f:
        f.write(header + arr.tobytes())


def _fake_mnist(root, split="train", n=7, compress=True, rng=None):
    rng = rng or np.random.default_rng(0)
    images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
    images[0, 0, 0], images[0, 0, 1] = 0, 255  # pin the range ends
    labels = rng.integers(0, 10, size=n, dtype=np.uint8)
    prefix = "train" if split == "train" else "t10k"
    sfx = ".gz" if compress else ""
    _write_idx(root / f"{prefix}-images-idx3-ubyte{sfx}", 2051, images, compress)
    _write_idx(root / f"{prefix}-labels-idx1-ubyte{sfx}", 2049, labels, compress)
    return images, labels


def _write_pickle(path, d):
    with open(path, "wb") as f:
        pickle.dump(d, f)


def _fake_cifar10(d, per_batch=2, rng=None):
    rng = rng or np.random.default_rng(1)
    d.mkdir(parents=True, exist_ok=True)
    train_x, train_y = [], []
    for i in range(1, 6):
        x = rng.integers(0, 256, size=(per_batch, 3072), dtype=np.uint8)
        y = rng.integers(0, 10, size=per_batch).tolist()
        _write_pickle(d / f"data_batch_{i}", {b"data": x, b"labels": y, b"batch_label": b"x"})
        train_x.append(x)
        train_y += y
    tx = rng.integers(0, 256, size=(3, 3072), dtype=np.uint8)
    ty = [9, 0, 4]
    _write_pickle(d / "test_batch", {b"data": tx, b"labels": ty})
    _write_pickle(d / "batches.meta", {b"label_names": [f"c{i}".encode() for i in range(10)]})
    return np.concatenate(train_x), np.array(train_y), tx, np.array(ty)


def _fake_cifar100(d, rng=None):
    rng = rng or np.random.default_rng(2)
    d.mkdir(parents=True, exist_ok=True)
    out = {}
    for split, n in (("train", 5), ("test", 3)):
        x = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
        fine = rng.integers(0, 100, size=n).tolist()
        fine[0] = 99
        _write_pickle(d / split, {b"data": x, b"fine_labels": fine, b"coarse_labels": [f // 5 for f in fine]})
        out[split] = (x, np.array(fine))
    _write_pickle(d / "meta", {b"fine_label_names": [f"f{i}".encode() for i in range(100)]})
    return out


def _small_ds(n=200, c=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    return IndexedDataset(
        torch.rand(n, 1, 4, 4, generator=g), torch.randint(0, c, (n,), generator=g), num_classes=c, name="toy"
    )


# ----------------------------------------------------------------------------- IndexedDataset / digits


def test_load_digits():
    ds = load_digits()
    assert len(ds) == 1797 and ds.num_classes == 10 and ds.name == "digits"
    assert ds.x.shape == (1797, 1, 8, 8) and ds.x.dtype == torch.float32
    assert ds.y.shape == (1797,) and ds.y.dtype == torch.int64
    assert float(ds.x.min()) == 0.0 and float(ds.x.max()) == 1.0
    assert set(ds.y.tolist()) == set(range(10))
    x, y, i = ds[5]
    assert i == 5 and torch.equal(x, ds.x[5]) and int(y) == int(ds.y[5])
    assert ds[-1][2] == 1796
    raw = load_digits(normalize=False)
    assert float(raw.x.max()) == 16.0
    assert torch.allclose(raw.x / 16, ds.x)
    sk = pytest.importorskip("sklearn.datasets").load_digits()  # read without it: the same data
    assert torch.equal(raw.x[:, 0], torch.from_numpy(sk.images).float())
    assert torch.equal(raw.y, torch.from_numpy(sk.target).long())


def test_indexed_dataset_with_dataloader_and_validation():
    ds = _small_ds(n=10)
    batches = list(torch.utils.data.DataLoader(ds, batch_size=4))
    assert torch.equal(torch.cat([b[2] for b in batches]), torch.arange(10))
    assert batches[0][2].dtype == torch.int64
    with pytest.raises(IndexError):
        ds[10]
    with pytest.raises(ValueError, match="same N"):
        IndexedDataset(torch.zeros(3, 2), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="labels must lie"):
        IndexedDataset(torch.zeros(2, 2), torch.tensor([0, 5]), num_classes=3)
    with pytest.raises(TypeError):
        IndexedDataset(torch.zeros(2, 2), torch.tensor([0.0, 1.0]))
    with pytest.raises(TypeError, match="num_classes"):
        IndexedDataset(torch.zeros(2, 2), torch.tensor([0, 1]), num_classes=2.0)
    with pytest.raises(ValueError, match="num_classes"):
        IndexedDataset(torch.zeros(0, 2), torch.zeros(0, dtype=torch.long), num_classes=-1)


# ----------------------------------------------------------------------------- with_index


class _Images(torch.utils.data.Dataset):
    """ImageFolder-like: (image tensor, class id) tuples from tensors held by the dataset."""

    def __init__(self, n=10, c=3):
        g = torch.Generator().manual_seed(0)
        self.images = torch.rand(n, 3, 4, 4, generator=g)
        self.labels = torch.randint(0, c, (n,), generator=g).tolist()

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return self.images[i], self.labels[i]


class _Records(torch.utils.data.Dataset):
    """Dict items, kept by the dataset (a cache): the wrapper must not add its key to them."""

    def __init__(self, n=6):
        self.items = [{"input_ids": torch.arange(i, i + 4), "label": i % 2} for i in range(n)]

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def test_with_index_appends_the_index_to_tuples_without_copying():
    base = _Images()
    ds = with_index(base)
    assert len(ds) == 10
    x, y, i = ds[3]
    assert i == 3 and y == base.labels[3] and x.data_ptr() == base.images[3].data_ptr()  # a view
    assert ds[-1][2] == 9 and ds[-10][2] == 0  # the index a negative position stands for
    for bad in (10, -11):
        with pytest.raises(IndexError, match="out of range"):
            ds[bad]
    with pytest.raises(TypeError, match="index must be an int"):
        ds["3"]
    assert with_index([[1.0, 0], [2.0, 1]])[1] == [2.0, 1, 1]  # a list item gains it likewise


def test_with_index_feeds_accumulate_through_a_dataloader():
    """The collated index is the [B] int64 tensor accumulate takes; each sample is scored once per
    epoch under its own id."""
    base = _Images(n=10)
    loader = torch.utils.data.DataLoader(with_index(base), batch_size=4, shuffle=True)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(48, 3))
    tracker = memcore.Tracker(len(base))
    seen = []
    for x, y, idx in loader:
        assert idx.dtype == torch.int64 and torch.equal(x, base.images[idx])
        assert y.tolist() == [base.labels[i] for i in idx.tolist()]
        memcore.accumulate(model(x), y, idx, tracker).backward()
        seen += idx.tolist()
    tracker.end_epoch()
    assert sorted(seen) == list(range(10)) and tracker.scores()["rows"].tolist() == [1.0] * 10


def test_with_index_adds_a_key_to_dict_items():
    base = _Records()
    ds = with_index(base)
    item = ds[2]
    assert (
        item["sample_index"] == 2 and item["label"] == 0 and item["input_ids"] is base.items[2]["input_ids"]
    )
    assert "sample_index" not in base.items[2]  # the dataset's own dict is unchanged
    assert with_index(base, key="idx")[5]["idx"] == 5
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=3)))
    assert batch["sample_index"].tolist() == [0, 1, 2] and batch["input_ids"].shape == (3, 4)
    with pytest.raises(ValueError, match="already holds the key 'label'"):
        with_index(base, key="label")[0]
    with pytest.raises(TypeError, match="key must be a str"):
        with_index(base, key=0)


def test_with_index_wraps_other_items_and_uses_a_batched_fetch():
    plain = torch.utils.data.Subset(list("abcdef"), [5, 3, 1])  # Subset fetches batches (__getitems__)
    ds = with_index(plain)
    assert ds[0] == ("f", 0) and ds.__getitems__([2, 0]) == [("b", 2), ("f", 0)]
    assert list(torch.utils.data.DataLoader(ds, batch_size=2, collate_fn=list)) == [
        [("f", 0), ("d", 1)],
        [("b", 2)],
    ]
    t = with_index(torch.utils.data.TensorDataset(torch.arange(4.0), torch.arange(4)))
    assert [v.item() if isinstance(v, torch.Tensor) else v for v in t[2]] == [2.0, 2, 2]


def test_with_index_on_a_hugging_face_dataset():
    datasets = pytest.importorskip("datasets")
    hf = datasets.Dataset.from_dict({"x": [[0.0, 1.0], [2.0, 3.0], [4.0, 5.0]], "y": [1, 0, 1]})
    ds = with_index(hf.with_format("torch"))
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=2, sampler=[2, 0])))
    assert batch["sample_index"].tolist() == [2, 0] and batch["y"].tolist() == [1, 1]
    assert torch.equal(batch["x"], torch.tensor([[4.0, 5.0], [0.0, 1.0]]))


def test_with_index_refuses_what_has_no_index():
    class Stream(torch.utils.data.IterableDataset):
        def __iter__(self):
            return iter(range(3))

    with pytest.raises(TypeError, match="IterableDataset"):
        with_index(Stream())
    with pytest.raises(TypeError, match="__len__"):
        with_index(iter(range(3)))


# ----------------------------------------------------------------------------- MNIST


@pytest.mark.parametrize("compress", [True, False])
def test_mnist_idx_roundtrip(tmp_path, compress):
    images, labels = _fake_mnist(tmp_path, "train", n=7, compress=compress)
    t_images, t_labels = _fake_mnist(tmp_path, "test", n=3, compress=compress, rng=np.random.default_rng(5))
    ds = load_mnist(tmp_path)
    assert ds.x.shape == (7, 1, 28, 28) and ds.x.dtype == torch.float32
    assert ds.y.dtype == torch.int64 and ds.num_classes == 10
    assert float(ds.x.min()) == 0.0 and float(ds.x.max()) == 1.0
    assert torch.allclose(ds.x[:, 0] * 255, torch.from_numpy(images).float())
    assert ds.y.tolist() == labels.tolist()
    assert ds.meta["header_count"] == 7
    test = load_mnist(str(tmp_path), split="test")
    assert len(test) == 3 and test.y.tolist() == t_labels.tolist()
    lim = load_mnist(tmp_path, limit=4)
    assert len(lim) == 4 and torch.equal(lim.x, ds.x[:4]) and torch.equal(lim.y, ds.y[:4])


def test_mnist_bad_files(tmp_path):
    _fake_mnist(tmp_path, "train", n=4)
    img = tmp_path / "train-images-idx3-ubyte.gz"
    lab = tmp_path / "train-labels-idx1-ubyte.gz"
    # wrong magic: the labels file where the images file should be
    img.write_bytes(lab.read_bytes())
    with pytest.raises(ValueError, match="magic.*train-images|train-images.*magic"):
        load_mnist(tmp_path)
    # truncated data
    _fake_mnist(tmp_path, "train", n=4)
    raw = gzip.decompress(img.read_bytes())
    img.write_bytes(gzip.compress(raw[:-10]))
    with pytest.raises(ValueError, match="train-images"):
        load_mnist(tmp_path)
    # image / label count mismatch
    _write_idx(img, 2051, np.zeros((3, 28, 28)), compress=True)
    with pytest.raises(ValueError, match="3 images.*4 labels"):
        load_mnist(tmp_path)
    with pytest.raises(ValueError, match="split"):
        load_mnist(tmp_path, split="val")
    with pytest.raises(ValueError, match="limit"):
        load_mnist(tmp_path, limit=0)


def test_mnist_missing(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(FileNotFoundError, match="train-images-idx3-ubyte.gz") as e:
        load_mnist(missing)
    assert str(missing) in str(e.value)
    _fake_mnist(tmp_path, "train", n=2)
    with pytest.raises(FileNotFoundError, match="t10k-images-idx3-ubyte") as e:
        load_mnist(tmp_path, split="test")
    assert str(tmp_path) in str(e.value)


def test_default_mnist_dir_env(tmp_path, monkeypatch):
    monkeypatch.setenv("MEMCORE_MNIST_DIR", str(tmp_path))
    assert default_mnist_dir() == tmp_path
    monkeypatch.setenv("MEMCORE_MNIST_DIR", str(tmp_path / "absent"))
    assert default_mnist_dir() != tmp_path / "absent"


def test_real_mnist(monkeypatch):
    monkeypatch.delenv("MEMCORE_MNIST_DIR", raising=False)
    root = default_mnist_dir()
    if root is None:
        pytest.skip("real MNIST not found (set MEMCORE_MNIST_DIR or provide ../shared/data/mnist)")
    ds = load_mnist(root, "train", limit=1000)
    assert ds.meta["header_count"] == 60000
    assert len(ds) == 1000 and ds.x.shape == (1000, 1, 28, 28) and ds.x.dtype == torch.float32
    assert float(ds.x.min()) == 0.0 and float(ds.x.max()) == 1.0
    assert int(ds.y.min()) == 0 and int(ds.y.max()) == 9 and len(set(ds.y.tolist())) == 10
    assert ds.y[:10].tolist() == [5, 0, 4, 1, 9, 2, 1, 3, 1, 4]  # the well-known first labels


# ----------------------------------------------------------------------------- CIFAR


def test_cifar10(tmp_path):
    d = tmp_path / "cifar-10-batches-py"
    tr_x, tr_y, te_x, te_y = _fake_cifar10(d)
    for root in (d, tmp_path):  # the directory itself, or its parent
        ds = load_cifar(root)
        assert ds.name == "cifar10-train" and ds.num_classes == 10
        assert ds.x.shape == (10, 3, 32, 32) and ds.x.dtype == torch.float32
        assert ds.y.dtype == torch.int64 and ds.y.tolist() == tr_y.tolist()
        assert 0.0 <= float(ds.x.min()) and float(ds.x.max()) <= 1.0
        # row layout: 1024 red, 1024 green, 1024 blue, each row-major 32x32
        assert torch.allclose(ds.x[3, 1, 2, 5] * 255, torch.tensor(float(tr_x[3, 1024 + 2 * 32 + 5])))
        assert ds.meta["class_names"][0] == "c0"
    test = load_cifar(tmp_path, split="test")
    assert test.y.tolist() == te_y.tolist() and test.x.shape == (3, 3, 32, 32)
    lim = load_cifar(d, limit=3)  # spans the first two batches
    assert len(lim) == 3 and lim.y.tolist() == tr_y[:3].tolist()
    (d / "data_batch_4").unlink()
    with pytest.raises(FileNotFoundError, match="data_batch_4"):
        load_cifar(d)


def test_cifar100(tmp_path):
    d = tmp_path / "cifar-100-python"
    data = _fake_cifar100(d)
    for root in (d, tmp_path):
        ds = load_cifar(root)
        assert ds.name == "cifar100-train" and ds.num_classes == 100
        assert ds.x.shape == (5, 3, 32, 32) and ds.y.tolist() == data["train"][1].tolist()
        assert torch.allclose(ds.x.reshape(5, -1) * 255, torch.from_numpy(data["train"][0]).float())
    test = load_cifar(d, "test")
    assert len(test) == 3 and test.y.tolist() == data["test"][1].tolist()
    assert test.meta["class_names"][99] == "f99"


def test_cifar_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="cifar-10-batches-py"):
        load_cifar(tmp_path)  # empty directory
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_cifar(tmp_path / "absent")
    _fake_cifar10(tmp_path / "cifar-10-batches-py")
    _fake_cifar100(tmp_path / "cifar-100-python")
    with pytest.raises(ValueError, match="both"):
        load_cifar(tmp_path)
    bad = tmp_path / "cifar-10-batches-py" / "test_batch"
    _write_pickle(bad, {b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]})
    with pytest.raises(ValueError, match="test_batch"):
        load_cifar(tmp_path / "cifar-10-batches-py", split="test")


class _RunsCode:
    """Pickles to a call of os.system: what a crafted "CIFAR batch" would carry."""

    def __init__(self, cmd):
        self.cmd = cmd

    def __reduce__(self):
        import os

        return (os.system, (self.cmd,))


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_cifar_refuses_a_pickle_that_runs_code(tmp_path, protocol):
    """The reader accepts only what the official release holds; a file naming os.system is refused
    before anything is called (the command would create a file)."""
    d = tmp_path / "cifar-10-batches-py"
    _fake_cifar10(d)
    marker = tmp_path / "pwned"
    # the call comes first in the file, so it is the first global the reader meets whatever the protocol
    payload = {"run": _RunsCode(f"touch {marker}"), b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 1]}
    with open(d / "test_batch", "wb") as f:
        pickle.dump(payload, f, protocol=protocol)
    with pytest.raises(ValueError, match=r"test_batch.*refusing to load the global (os|posix|nt)\.system"):
        load_cifar(d, split="test")
    assert not marker.exists()
    # the reader itself still loads what the release holds (dicts, lists, bytes, numpy arrays)
    assert len(load_cifar(d, split="train")) == 10


# ----------------------------------------------------------------------------- label noise


@pytest.mark.parametrize("rate", [0.0, 0.1, 0.37])
def test_label_noise(rate):
    ds = _small_ds(n=200)
    y0 = ds.y.clone()
    noisy, flipped = inject_label_noise(ds, rate, seed=3)
    assert flipped.dtype == torch.bool and flipped.shape == (200,)
    assert int(flipped.sum()) == round(rate * 200)
    assert torch.all(noisy.y[flipped] != y0[flipped])
    assert torch.equal(noisy.y[~flipped], y0[~flipped])
    assert torch.equal(ds.y, y0) and "noise" not in ds.meta  # input untouched
    assert noisy.y.min() >= 0 and noisy.y.max() < 10 and noisy.num_classes == 10
    rec = noisy.meta["noise"]
    assert rec["rate"] == rate and rec["seed"] == 3
    assert torch.equal(rec["flipped_indices"], flipped.nonzero().squeeze(1))
    assert torch.equal(rec["original_labels"], y0[flipped])
    assert torch.equal(noisy.x, ds.x)


def test_label_noise_seeds_and_uniformity():
    ds = _small_ds(n=2000, c=4)
    a, fa = inject_label_noise(ds, 0.5, seed=1)
    b, fb = inject_label_noise(ds, 0.5, seed=1)
    c, fc = inject_label_noise(ds, 0.5, seed=2)
    assert torch.equal(fa, fb) and torch.equal(a.y, b.y)
    assert not torch.equal(fa, fc)
    # the new label is uniform over the 3 other classes: each offset ~1/3 of the 1000 flips
    offsets = (a.y[fa] - ds.y[fa]) % 4
    counts = torch.bincount(offsets, minlength=4)
    assert counts[0] == 0 and all(250 < int(n) < 420 for n in counts[1:])
    # two classes: every flip is the other class
    two = _small_ds(n=50, c=2)
    t, ft = inject_label_noise(two, 0.4)
    assert torch.equal(t.y[ft], 1 - two.y[ft])


@pytest.mark.parametrize("rate", [-0.1, 1.0, 1.5])
def test_label_noise_bad_rate(rate):
    with pytest.raises(ValueError, match="rate"):
        inject_label_noise(_small_ds(), rate)


def test_label_noise_twice_refused():
    noisy, _ = inject_label_noise(_small_ds(), 0.1)
    with pytest.raises(ValueError, match="noise"):
        inject_label_noise(noisy, 0.1)


# ----------------------------------------------------------------------------- duplicates


def test_duplicates():
    ds = _small_ds(n=100)
    x0, y0 = ds.x.clone(), ds.y.clone()
    dup, is_dup = inject_duplicates(ds, 15, seed=4)
    assert len(dup) == 115 and dup.x.shape == (115, 1, 4, 4)
    assert is_dup.dtype == torch.bool and is_dup.shape == (115,)
    assert not is_dup[:100].any() and is_dup[100:].all()
    src = dup.meta["duplicates"]["source_indices"]
    assert dup.meta["duplicates"]["k"] == 15 and dup.meta["duplicates"]["seed"] == 4
    assert len(set(src.tolist())) == 15 and int(src.max()) < 100
    assert torch.equal(dup.x[100:], x0[src])
    assert torch.all(dup.y[100:] != y0[src])
    assert torch.equal(dup.x[:100], x0) and torch.equal(dup.y[:100], y0)
    assert torch.equal(ds.x, x0) and torch.equal(ds.y, y0) and len(ds) == 100
    assert dup[114][2] == 114
    again, _ = inject_duplicates(ds, 15, seed=4)
    assert torch.equal(again.y, dup.y) and torch.equal(again.meta["duplicates"]["source_indices"], src)
    with pytest.raises(ValueError, match="k must be"):
        inject_duplicates(ds, 101)
    empty, none = inject_duplicates(ds, 0)
    assert len(empty) == 100 and not none.any()


def test_noise_then_duplicates_keeps_both_records():
    noisy, flipped = inject_label_noise(_small_ds(), 0.2)
    both, is_dup = inject_duplicates(noisy, 5)
    assert set(both.meta) >= {"noise", "duplicates"}
    assert torch.equal(both.y[:200][flipped], noisy.y[flipped])
