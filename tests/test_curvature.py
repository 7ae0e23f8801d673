"""The curvature family: Philox generator, the three kernels, memcore.curvature against closed-form
and double-backward Hessians, batch invariance, model hygiene, bad input, CurvatureTracker."""

import math

import pytest
import torch

import memcore
from memcore import _C

ops = torch.ops.memcore
DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
cuda_only = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


# ------------------------------------------------------------------------------ models
class RowLinear(torch.nn.Module):
    """z = W x + b computed row by row (elementwise product + sum), so every row's result is
    bit-identical whatever the batch it is in: lets the tests compare batchings exactly."""

    def __init__(self, d, c, dtype=torch.float64):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(c, d, dtype=dtype) / d**0.5)
        self.bias = torch.nn.Parameter(0.1 * torch.randn(c, dtype=dtype))

    def forward(self, x):
        return (x.reshape(x.shape[0], 1, -1) * self.weight).sum(-1) + self.bias


def _mlp(d, c, dtype=torch.float64):
    return torch.nn.Sequential(torch.nn.Linear(d, 32), torch.nn.Tanh(), torch.nn.Linear(32, c)).to(dtype)


def _linear_hessians(weight, bias, x):
    """Input Hessians of the cross-entropy of z = W x + b: H = W^T (diag(p) - p p^T) W, [B, D, D]."""
    p = torch.softmax(x @ weight.T + bias, 1)
    mid = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
    return weight.T @ mid @ weight


def _data(b, d, c, dtype=torch.float64, gen=None):
    return torch.randn(b, d, dtype=dtype, generator=gen), torch.randint(0, c, (b,), generator=gen)


# ------------------------------------------------------------------------------ generator
KAT = [  # Random123 known-answer vectors for philox4x32-10: counter, key (lo, hi), output
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF, 0xFFFFFFFF), (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    (
        (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344),
        (0xA4093822, 0x299F31D0),
        (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1),
    ),
]


def _seed_of(key):
    s = key[0] | (key[1] << 32)
    return s - (1 << 64) if s >= (1 << 63) else s


@pytest.mark.parametrize("counter,key,expected", KAT)
def test_philox_known_answers(counter, key, expected):
    """The generator every curvature kernel runs (csrc/philox.h, the same code on host and device;
    the CUDA kernels' draws equal the CPU kernels' bit for bit: test_cuda_matches_cpu)."""
    out = _C._philox4x32(torch.tensor([counter]), _seed_of(key))
    assert out[0].tolist() == list(expected)


def test_rademacher_layout_is_the_documented_philox_counter():
    """Entry e of probe q of sample i is bit (e % 32) of word (e % 128) // 32 of
    Philox(counter = (e // 128, q, i lo, i hi), key = seed)."""
    seed, index = -5, torch.tensor([3, (7 << 32) + 11])
    v = ops.rademacher(index, seed, 4, 2, [300], torch.float32)  # [2, 2, 300]
    for q in range(2):
        for b, i in enumerate(index.tolist()):
            blocks = torch.tensor([[blk, 4 + q, i & 0xFFFFFFFF, i >> 32] for blk in range(3)])
            words = _C._philox4x32(blocks, seed)
            for e in (0, 31, 32, 127, 128, 200, 299):
                bit = (int(words[e // 128, (e % 128) // 32]) >> (e % 32)) & 1
                assert v[q, b, e].item() == (1.0 if bit else -1.0)


@pytest.mark.parametrize("dtype", DTYPES)
def test_rademacher_is_pm1_balanced_and_reproducible(dtype, device):
    index = torch.arange(40, device=device)
    v = ops.rademacher(index, 7, 0, 5, [3, 333], dtype)
    assert v.shape == (5, 40, 3, 333) and v.dtype == dtype and v.device.type == device
    assert ((v == 1) | (v == -1)).all()
    n = v.numel()
    assert abs(v.double().mean().item()) < 5 / math.sqrt(n)
    # each sample / probe / element position is balanced too, not just the total
    assert v.double().mean((0, 2, 3)).abs().max() < 6 / math.sqrt(n / 40)
    assert torch.equal(v, ops.rademacher(index, 7, 0, 5, [3, 333], dtype))
    assert torch.equal(v.float(), ops.rademacher(index, 7, 0, 5, [3, 333], torch.float32))
    assert not torch.equal(v, ops.rademacher(index, 8, 0, 5, [3, 333], dtype))  # seed matters
    assert (v[0] != v[1]).float().mean() > 0.4  # probes differ
    assert (v[:, 0] != v[:, 1]).float().mean() > 0.4  # samples differ


def test_rademacher_independent_of_batch_order_size_and_probe_chunks(device):
    index = torch.tensor([5, 900, 2, 77, 31], device=device)
    v = ops.rademacher(index, 1, 0, 9, [257], torch.float32)
    perm = torch.tensor([3, 0, 4, 1, 2], device=device)
    assert torch.equal(ops.rademacher(index[perm], 1, 0, 9, [257], torch.float32), v[:, perm])
    assert torch.equal(ops.rademacher(index[2:3], 1, 0, 9, [257], torch.float32), v[:, 2:3])
    parts = [ops.rademacher(index, 1, p0, n, [257], torch.float32) for p0, n in ((0, 4), (4, 1), (5, 4))]
    assert torch.equal(torch.cat(parts), v)


@pytest.mark.parametrize("dtype", DTYPES)
def test_rademacher_perturb_is_x_plus_h_v(dtype, device):
    x = torch.randn(6, 2, 70, device=device).to(dtype)
    index = torch.arange(10, 16, device=device)
    out = ops.rademacher_perturb(x, index, 3, 2, 4, 0.25)
    v = ops.rademacher(index, 3, 2, 4, [2, 70], dtype)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    assert out.shape == (4, 6, 2, 70) and out.dtype == dtype
    assert torch.equal(out, (x.to(acc) + 0.25 * v.to(acc)).to(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
def test_probe_reduce_matches_reference(dtype, device):
    gc = torch.randn(5, 3, 100, device=device).to(dtype)
    gp = torch.randn(4, 5, 3, 100, device=device).to(dtype)
    index = torch.tensor([0, 1, 2, 1 << 40, 9], device=device)
    sq, vd = ops.probe_reduce(gp, gc, index, 11, 6)
    assert sq.dtype == vd.dtype == torch.float64 and sq.shape == vd.shape == (4, 5)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    d = (gp.to(acc) - gc.to(acc)).double().flatten(2)
    v = ops.rademacher(index, 11, 6, 4, [3, 100], torch.float64).flatten(2)
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(sq, d.pow(2).sum(-1), **tol)
    torch.testing.assert_close(vd, (d * v).sum(-1), **tol)


def test_probe_reduce_rows_do_not_depend_on_batching(device):
    gc = torch.randn(6, 1000, device=device)
    gp = torch.randn(5, 6, 1000, device=device)
    index = torch.arange(20, 26, device=device)
    sq, vd = ops.probe_reduce(gp, gc, index, 2, 0)
    perm = torch.tensor([5, 3, 1, 0, 2, 4], device=device)
    sq2, vd2 = ops.probe_reduce(gp[:, perm].contiguous(), gc[perm], index[perm], 2, 0)
    assert torch.equal(sq2, sq[:, perm]) and torch.equal(vd2, vd[:, perm])
    sq3, vd3 = ops.probe_reduce(gp[2:4, 1:3].contiguous(), gc[1:3], index[1:3], 2, 2)
    assert torch.equal(sq3, sq[2:4, 1:3]) and torch.equal(vd3, vd[2:4, 1:3])


def test_empty_shapes(device):
    idx = torch.zeros(0, dtype=torch.int64, device=device)
    assert ops.rademacher(idx, 0, 0, 3, [4], torch.float32).shape == (3, 0, 4)
    assert ops.rademacher_perturb(torch.zeros(0, 4, device=device), idx, 0, 0, 3, 0.1).shape == (3, 0, 4)
    sq, vd = ops.probe_reduce(
        torch.zeros(2, 0, 4, device=device), torch.zeros(0, 4, device=device), idx, 0, 0
    )
    assert sq.shape == (2, 0)
    one = torch.tensor([3], device=device)
    sq, _ = ops.probe_reduce(torch.ones(2, 1, device=device), torch.zeros(1, device=device), one, 0, 0)
    assert sq.cpu().tolist() == [[1.0], [1.0]]  # 1-d inputs: one element per sample


def test_opcheck_curvature_ops(device):
    idx = torch.tensor([4, 0, 9], device=device)
    x = torch.randn(3, 2, 5, device=device)
    torch.library.opcheck(ops.rademacher.default, (idx, 1, 0, 4, [2, 5], torch.float32))
    torch.library.opcheck(ops.rademacher_perturb.default, (x, idx, 1, 2, 3, 1e-2))
    torch.library.opcheck(ops.rademacher_perturb.default, (x.double().requires_grad_(), idx, 1, 2, 3, 1e-2))
    torch.library.opcheck(ops.probe_reduce.default, (torch.randn(4, 3, 2, 5, device=device), x, idx, 1, 0))


@pytest.mark.parametrize(
    "call,match",
    [
        (
            lambda: ops.rademacher_perturb(torch.randn(3, 4), torch.arange(2), 0, 0, 1, 0.1),
            "index must be 1-D",
        ),
        (lambda: ops.rademacher_perturb(torch.randn(3, 4), torch.arange(3).int(), 0, 0, 1, 0.1), "int64"),
        (lambda: ops.rademacher_perturb(torch.randn(3, 4).t(), torch.arange(4), 0, 0, 1, 0.1), "contiguous"),
        (lambda: ops.rademacher_perturb(torch.arange(3), torch.arange(3), 0, 0, 1, 0.1), "float"),
        (lambda: ops.rademacher_perturb(torch.randn(3, 4), torch.arange(3), 0, 0, -1, 0.1), "n_probes"),
        (lambda: ops.rademacher(torch.arange(3), 0, (1 << 32) - 1, 2, [4], torch.float32), "2\\^32"),
        (lambda: ops.rademacher(torch.arange(3), 0, 0, 2, [4], torch.int32), "dtype"),
        (
            lambda: ops.probe_reduce(torch.randn(2, 3, 5), torch.randn(3, 4), torch.arange(3), 0, 0),
            "grad_perturbed",
        ),
        (
            lambda: ops.probe_reduce(torch.randn(2, 3, 4).double(), torch.randn(3, 4), torch.arange(3), 0, 0),
            "dtype",
        ),
        (lambda: _C._philox4x32(torch.zeros(3, 3, dtype=torch.int64), 0), "counter"),
    ],
)
def test_direct_op_calls_check_their_arguments(call, match):
    with pytest.raises(RuntimeError, match=match):
        call()


# ------------------------------------------------------------------------------ curvature
def test_trace_converges_to_closed_form_hessian_trace():
    gen = torch.Generator().manual_seed(3)
    model = RowLinear(16, 4)
    x, y = _data(8, 16, 4, gen=gen)
    exact = _linear_hessians(model.weight.detach(), model.bias.detach(), x).diagonal(dim1=1, dim2=2).sum(-1)
    err = {}
    for n in (8, 2000):
        est = memcore.curvature(model, x, y, n_probes=n, max_rows=4096)["trace"]
        err[n] = ((est - exact).abs() / exact).mean().item()
    assert err[2000] < 0.04, err
    assert err[2000] < err[8] / 3, err


def test_fd_matches_closed_form_hessian_vector_products():
    """Same probes through the closed-form H: curvature = mean ||h H v||, trace = mean v.Hv."""
    gen = torch.Generator().manual_seed(4)
    model = RowLinear(24, 5)
    x, y = _data(6, 24, 5, gen=gen)
    index = torch.tensor([8, 1, 30, 2, 17, 5])
    h, n = 1e-3, 16
    H = _linear_hessians(model.weight.detach(), model.bias.detach(), x)
    v = ops.rademacher(index, 9, 0, n, [24], torch.float64)  # [n, B, D]
    hv = torch.einsum("bij,pbj->pbi", H, v)
    out = memcore.curvature(model, x, y, index=index, n_probes=n, h=h, seed=9)
    torch.testing.assert_close(out["curvature"], (h * hv).norm(dim=-1).mean(0), rtol=2e-3, atol=0)
    torch.testing.assert_close(out["trace"], (v * hv).sum(-1).mean(0), rtol=2e-3, atol=1e-5)
    hvp = memcore.curvature(model, x, y, index=index, n_probes=n, h=h, seed=9, mode="hvp")
    torch.testing.assert_close(hvp["curvature"], (h * hv).norm(dim=-1).mean(0), rtol=1e-10, atol=0)
    torch.testing.assert_close(hvp["trace"], (v * hv).sum(-1).mean(0), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("shape", [(20,), (1, 4, 5)])
def test_fd_matches_hvp_on_mlp_and_cnn(shape):
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(7, *shape, dtype=torch.float64, generator=gen)
    y = torch.randint(0, 3, (7,), generator=gen)
    if len(shape) == 1:
        model = _mlp(20, 3)
    else:
        model = torch.nn.Sequential(
            torch.nn.Conv2d(1, 3, 3, padding=1),
            torch.nn.Softplus(),
            torch.nn.Flatten(),
            torch.nn.Linear(60, 3),
        ).double()
    fd = memcore.curvature(model, x, y, n_probes=6, h=1e-4, max_rows=10)
    hvp = memcore.curvature(model, x, y, n_probes=6, h=1e-4, mode="hvp", max_rows=4)
    torch.testing.assert_close(fd["curvature"], hvp["curvature"], rtol=2e-3, atol=0)
    torch.testing.assert_close(
        fd["trace"], hvp["trace"], rtol=5e-3, atol=1e-3 * hvp["trace"].abs().max().item()
    )


@pytest.mark.parametrize("model_kind", ["row_linear", "row_mlp"])
def test_scores_do_not_depend_on_batching(model_kind):
    """Permuting, splitting or chunking the batch gives bit-identical scores (the model here is
    itself row-invariant, so any difference would come from memcore)."""
    gen = torch.Generator().manual_seed(6)
    torch.manual_seed(6)
    model = (
        RowLinear(40, 5)
        if model_kind == "row_linear"
        else torch.nn.Sequential(RowLinear(40, 12), torch.nn.Tanh(), RowLinear(12, 5))
    )
    x, y = _data(10, 40, 5, gen=gen)
    index = torch.randperm(1000, generator=gen)[:10]
    kw = dict(n_probes=7, h=1e-3, seed=123)
    ref = memcore.curvature(model, x, y, index=index, **kw)
    perm = torch.randperm(10, generator=gen)
    got = memcore.curvature(model, x[perm], y[perm], index=index[perm], **kw)
    for k in ref:
        assert torch.equal(got[k], ref[k][perm]), k
    parts = [
        memcore.curvature(model, x[a:b], y[a:b], index=index[a:b], **kw) for a, b in ((0, 3), (3, 4), (4, 10))
    ]
    for k in ref:
        assert torch.equal(torch.cat([p[k] for p in parts]), ref[k]), k
    for max_rows in (1, 3, 10, 25, 71):
        got = memcore.curvature(model, x, y, index=index, max_rows=max_rows, **kw)
        for k in ref:
            assert torch.equal(got[k], ref[k]), (k, max_rows)


def test_scores_with_ordinary_layers_agree_across_batchings():
    """nn.Linear's matmul may round differently for another batch size; scores agree closely."""
    gen = torch.Generator().manual_seed(7)
    model = _mlp(30, 4)
    x, y = _data(9, 30, 4, gen=gen)
    ref = memcore.curvature(model, x, y, n_probes=5)
    split = [
        memcore.curvature(model, x[a:b], y[a:b], index=torch.arange(a, b), n_probes=5)
        for a, b in ((0, 4), (4, 9))
    ]
    chunked = memcore.curvature(model, x, y, n_probes=5, max_rows=7)
    for k in ref:
        torch.testing.assert_close(torch.cat([s[k] for s in split]), ref[k], rtol=1e-9, atol=0)
        torch.testing.assert_close(chunked[k], ref[k], rtol=1e-9, atol=0)


def test_index_and_seed_select_the_probes():
    model = RowLinear(12, 3)
    x, y = _data(4, 12, 3)
    a = memcore.curvature(model, x, y, n_probes=3)
    assert torch.equal(
        memcore.curvature(model, x, y, n_probes=3, index=torch.arange(4))["curvature"], a["curvature"]
    )
    assert not torch.equal(memcore.curvature(model, x, y, n_probes=3, seed=1)["curvature"], a["curvature"])
    assert not torch.equal(
        memcore.curvature(model, x, y, n_probes=3, index=torch.arange(4) + 1)["curvature"], a["curvature"]
    )
    # the first probes of a longer run are the same probes
    one = memcore.curvature(model, x, y, n_probes=1, mode="hvp")
    two = memcore.curvature(model, x, y, n_probes=2, mode="hvp")
    assert not torch.equal(one["trace"], two["trace"])
    assert torch.equal(memcore.curvature(model, x, y, n_probes=1, mode="hvp")["trace"], one["trace"])


def test_model_parameters_grads_and_mode_untouched():
    model = torch.nn.Sequential(
        torch.nn.Linear(10, 16),
        torch.nn.BatchNorm1d(16),
        torch.nn.ReLU(),
        torch.nn.Dropout(0.5),
        torch.nn.Linear(16, 3),
    )
    x, y = torch.randn(8, 10), torch.randint(0, 3, (8,))
    model(x).sum().backward()  # some existing gradients, and BN running stats
    model[4].weight.grad = None  # and one parameter without .grad
    model[1].eval()  # a submodule in another mode than its parent
    before = {k: v.clone() for k, v in model.state_dict().items()}
    grads = [None if p.grad is None else p.grad.clone() for p in model.parameters()]
    out = memcore.curvature(model, x, y, n_probes=3)
    assert model.training and not model[1].training and model[3].training
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    for p, g in zip(model.parameters(), grads):
        assert (p.grad is None and g is None) or torch.equal(p.grad, g)
    # eval mode: dropout off, BN uses running statistics -> deterministic
    again = memcore.curvature(model, x, y, n_probes=3)
    assert torch.equal(out["curvature"], again["curvature"])
    model.eval()
    memcore.curvature(model, x, y, n_probes=1, mode="hvp")
    assert not model.training


def test_runs_under_no_grad_and_inference_mode():
    model = _mlp(6, 3, torch.float32)
    x, y = torch.randn(4, 6), torch.randint(0, 3, (4,))
    ref = memcore.curvature(model, x, y, n_probes=2)
    with torch.no_grad():
        assert torch.equal(memcore.curvature(model, x, y, n_probes=2)["curvature"], ref["curvature"])
    with torch.inference_mode():
        xi = x.clone()
        out = memcore.curvature(model, xi, y, n_probes=2)
    assert torch.equal(out["curvature"], ref["curvature"])


def test_outputs_dtype_device_and_low_precision():
    model = _mlp(8, 3, torch.float32)
    x, y = torch.randn(5, 8), torch.randint(0, 3, (5,))
    out = memcore.curvature(model, x, y, n_probes=2)
    assert set(out) == {"curvature", "trace"}
    assert all(v.dtype == torch.float64 and v.shape == (5,) and v.device == x.device for v in out.values())
    low = memcore.curvature(model.bfloat16(), x.bfloat16(), y, n_probes=2, h=5e-2)
    assert torch.isfinite(low["curvature"]).all() and (low["curvature"] > 0).all()
    empty = memcore.curvature(model, x[:0].bfloat16(), y[:0])
    assert empty["curvature"].shape == (0,)


@cuda_only
def test_cuda_matches_cpu():
    idx = torch.tensor([0, 5, 1 << 33, 7])
    for dtype in DTYPES:
        v = ops.rademacher(idx, -3, 2, 5, [3, 130], dtype)
        assert torch.equal(ops.rademacher(idx.cuda(), -3, 2, 5, [3, 130], dtype).cpu(), v)
        x = torch.randn(4, 3, 130).to(dtype)
        assert torch.equal(
            ops.rademacher_perturb(x.cuda(), idx.cuda(), 9, 0, 3, 1e-2).cpu(),
            ops.rademacher_perturb(x, idx, 9, 0, 3, 1e-2),
        )
        gp = torch.randn(3, 4, 3, 130).to(dtype)
        for a, b in zip(
            ops.probe_reduce(gp.cuda(), x.cuda(), idx.cuda(), 9, 0), ops.probe_reduce(gp, x, idx, 9, 0)
        ):
            torch.testing.assert_close(a.cpu(), b, rtol=1e-5 if dtype != torch.float64 else 1e-12, atol=1e-6)
    model = _mlp(20, 4)
    x, y = _data(6, 20, 4)
    cpu = memcore.curvature(model, x, y, index=idx[:1].repeat(6) + torch.arange(6), n_probes=4)
    gpu = memcore.curvature(
        model.cuda(), x.cuda(), y.cuda(), index=(idx[:1].repeat(6) + torch.arange(6)).cuda(), n_probes=4
    )
    for k in cpu:
        assert gpu[k].device.type == "cuda"
        torch.testing.assert_close(gpu[k].cpu(), cpu[k], rtol=1e-7, atol=0)


# ------------------------------------------------------------------------------ bad input
def _bad_case(case):
    model = _mlp(6, 3, torch.float32)
    x, y, kw = torch.randn(4, 6), torch.randint(0, 3, (4,)), {}
    if case == "targets_shape":
        y = y[:3]
    elif case == "targets_float":
        y = y.float()
    elif case == "index_shape":
        kw["index"] = torch.arange(5)
    elif case == "index_float":
        kw["index"] = torch.arange(4.0)
    elif case == "index_negative":
        kw["index"] = torch.tensor([0, 1, -2, 3])
    elif case == "inputs_int":
        x = torch.randint(0, 3, (4, 6))
    elif case == "inputs_list":
        x = x.tolist()
    elif case == "n_probes_0":
        kw["n_probes"] = 0
    elif case == "n_probes_float":
        kw["n_probes"] = 2.0
    elif case == "h_0":
        kw["h"] = 0.0
    elif case == "h_negative":
        kw["h"] = -1e-3
    elif case == "h_nan":
        kw["h"] = float("nan")
    elif case == "h_str":
        kw["h"] = "1e-3"
    elif case == "seed":
        kw["seed"] = 1.5
    elif case == "mode":
        kw["mode"] = "exact"
    elif case == "max_rows":
        kw["max_rows"] = 0
    elif case == "target_range":
        y = torch.tensor([0, 1, 3, 0])
    elif case == "model_output":
        model = torch.nn.Identity()
        x = torch.randn(4, 2, 3)
    elif case == "model_type":
        model = "resnet"
    return model, x, y, kw


@pytest.mark.parametrize(
    "case,exc,match",
    [
        ("targets_shape", ValueError, "targets"),
        ("targets_float", TypeError, "targets"),
        ("index_shape", ValueError, "index"),
        ("index_float", TypeError, "index"),
        ("index_negative", IndexError, "index\\[2\\]"),
        ("inputs_int", TypeError, "inputs"),
        ("inputs_list", TypeError, "inputs"),
        ("n_probes_0", ValueError, "n_probes"),
        ("n_probes_float", TypeError, "n_probes"),
        ("h_0", ValueError, "h must"),
        ("h_negative", ValueError, "h must"),
        ("h_nan", ValueError, "h must"),
        ("h_str", TypeError, "h must"),
        ("seed", TypeError, "seed"),
        ("mode", ValueError, "mode"),
        ("max_rows", ValueError, "max_rows"),
        ("target_range", IndexError, "targets\\[2\\]"),
        ("model_output", ValueError, "logits"),
        ("model_type", TypeError, "model"),
    ],
)
def test_bad_input_raises_clearly(case, exc, match):
    model, x, y, kw = _bad_case(case)
    if isinstance(model, torch.nn.Module):
        model.train()
    with pytest.raises(exc, match=match):
        memcore.curvature(model, x, y, **kw)
    if isinstance(model, torch.nn.Module):
        assert model.training  # restored even when the call fails


# ------------------------------------------------------------------------------ tracker
def _loader(x, y, batch, order=None):
    order = torch.arange(len(x)) if order is None else order
    return [
        (x[order[i : i + batch]], y[order[i : i + batch]], order[i : i + batch])
        for i in range(0, len(order), batch)
    ]


def test_tracker_averages_updates_and_round_trips_state_dict():
    torch.manual_seed(8)
    model = _mlp(10, 3)
    x, y = _data(12, 10, 3)
    tr = memcore.CurvatureTracker(14, n_probes=3, h=1e-3, seed=5, progress=False)
    first = tr.update(model, _loader(x, y, 5))
    expected0 = memcore.curvature(model, x, y, n_probes=3, seed=5)
    torch.testing.assert_close(first["curvature"][:12], expected0["curvature"], rtol=1e-9, atol=0)
    assert first["curvature"][12:].isnan().all()
    state = tr.state_dict()
    with torch.no_grad():
        model[0].weight.mul_(1.5)  # the model moves on between epochs
    tr.update(model, _loader(x, y, 4, order=torch.randperm(12)))
    expected1 = memcore.curvature(model, x, y, n_probes=3, seed=5 + (1 << 32))  # fresh probes
    s = tr.scores()
    assert set(s) == {"curvature", "curvature_trace", "curvature_count"}
    torch.testing.assert_close(
        s["curvature"][:12], (expected0["curvature"] + expected1["curvature"]) / 2, rtol=1e-9, atol=0
    )
    torch.testing.assert_close(
        s["curvature_trace"][:12], (expected0["trace"] + expected1["trace"]) / 2, rtol=1e-9, atol=1e-12
    )
    assert s["curvature"][12:].isnan().all() and s["curvature_count"].tolist() == [2.0] * 12 + [0.0] * 2

    resumed = memcore.CurvatureTracker(14, n_probes=9, progress=False)  # settings come from the state
    resumed.load_state_dict(state)
    assert (resumed.n_probes, resumed.seed, resumed.updates) == (3, 5, 1)
    resumed.update(model, _loader(x, y, 4, order=torch.randperm(12)))
    for k, v in resumed.scores().items():
        torch.testing.assert_close(v, s[k], rtol=1e-12, atol=0, equal_nan=True)


def test_tracker_same_probes_and_bad_input():
    model = _mlp(4, 2)
    x, y = _data(6, 4, 2)
    tr = memcore.CurvatureTracker(6, n_probes=2, fresh_probes=False, progress=False)
    a = tr.update(model, _loader(x, y, 6))
    b = tr.update(model, _loader(x, y, 2))
    torch.testing.assert_close(a["curvature"], b["curvature"], rtol=1e-9, atol=0)
    with pytest.raises(IndexError, match="num_samples"):
        tr.update(model, [(x, y, torch.arange(6) + 1)])
    with pytest.raises(ValueError, match="index"):
        tr.update(model, [(x, y)])
    with pytest.raises(ValueError, match="num_samples"):
        memcore.CurvatureTracker(7).load_state_dict(tr.state_dict())
    with pytest.raises(ValueError, match="state_dict"):
        tr.load_state_dict({"csl": 1})
    with pytest.raises(ValueError, match="num_samples"):
        memcore.CurvatureTracker(0)
    assert tr.updates == 2
