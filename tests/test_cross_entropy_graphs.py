"""accumulate inside CUDA-graph capture: no host sync, rows committed on the device by every replay,
errors deferred; refusals before anything is captured (linear_accumulate's GEMM probe included); a
CPU run never initializes CUDA."""

import os
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch
from reference import assert_same_state

import memcore
from memcore import _C
from memcore.linear_cross_entropy import settle_gemm


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_strict_tracker_inside_cuda_graph_capture_defers_errors():
    tr = memcore.Tracker(8, device="cuda")  # strict=True
    z = torch.randn(8, 5, device="cuda")
    y = torch.randint(0, 5, (8,), device="cuda")
    idx = torch.arange(8, device="cuda")
    memcore.accumulate(z, y, idx, tr)  # warm-up outside capture
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        memcore.accumulate(z, y, idx, tr)
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        memcore.accumulate(z, y, idx, tr)
    graph.replay()
    torch.cuda.synchronize()
    assert int(tr.scores()["rows"].sum()) == 8 * 3  # warm-up, side stream and replay (capture runs nothing)
    y.fill_(99)  # out of range: the replay's error surfaces at the next check
    graph.replay()
    with pytest.raises(ValueError, match="rejected"):
        tr.end_epoch()


def _pretend_capture(monkeypatch):
    """Makes torch report a CUDA-graph capture in progress (the two torch calls memcore asks), and
    makes every host read of a tensor fail, as a capture would."""
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)

    def sync(self, *args):
        raise AssertionError("host sync inside a CUDA-graph capture")

    for name in ("item", "__bool__", "__int__", "tolist"):
        monkeypatch.setattr(torch.Tensor, name, sync)


def test_strict_tracker_defers_errors_while_a_stream_captures(monkeypatch):
    """Strict mode syncs per step; during a capture it must not (the capture would break): the bad
    batch is skipped on the device and its error raised at the next end_epoch, as under compile."""
    tr = memcore.Tracker(8, flush_every=2)  # strict; a buffered call inside the capture would flush
    z, y, idx = torch.randn(8, 5), torch.randint(0, 5, (8,)), torch.arange(8)
    memcore.accumulate(z, y, idx, tr)  # the warm-up step, outside the capture: buffered
    pending = tr.buffered_bytes()
    ref = memcore.Tracker(8)
    for _ in range(3):
        memcore.accumulate(z, y, idx, ref)
    _pretend_capture(monkeypatch)
    memcore.accumulate(z, y, idx, tr)
    memcore.accumulate(z, torch.full((8,), 7), idx, tr)  # targets out of range: no raise here
    memcore.accumulate(z, y, idx, tr, reduction="none")
    # committed on the device at once: a row buffered for the next flush would be read once, not
    # once per replay of the graph
    assert tr.buffered_bytes() == pending
    monkeypatch.undo()
    with pytest.raises(ValueError, match="rejected"):
        tr.end_epoch()
    assert_same_state(tr.state_dict(), ref.state_dict())  # the bad batch added nothing


def test_capture_refuses_a_tracker_without_state_or_distributed(monkeypatch):
    z, y, idx = torch.randn(4, 3), torch.tensor([0, 1, 2, 0]), torch.arange(4)
    fresh, ranks = memcore.Tracker(4), memcore.Tracker(4, distributed=True)
    _pretend_capture(monkeypatch)
    with pytest.raises(RuntimeError, match="warm-up"):  # device=None: it would move inside the graph
        memcore.accumulate(z, y, idx, fresh)
    with pytest.raises(RuntimeError, match="distributed"):
        memcore.accumulate(z, y, idx, ranks)
    x = torch.randn(4, 3, requires_grad=True)
    memcore.accumulate(x * 2, y, idx, fresh.to("cpu"))  # state ready, but no input-gradient fields
    loss = memcore.accumulate(x * 2, y, idx, fresh, inputs=x)
    with pytest.raises(RuntimeError, match="inputs="):
        loss.backward()


@pytest.mark.slow
def test_cpu_run_does_not_initialize_cuda():
    """The capture check asks torch.cuda only once CUDA is initialized (asking would initialize it)."""
    code = (
        "import torch, memcore\n"
        "tr = memcore.Tracker(4)\n"
        "x = torch.randn(4, 3, requires_grad=True)\n"
        "memcore.accumulate(x, torch.tensor([0, 1, 2, 0]), torch.arange(4), tr, inputs=x).backward()\n"
        "tr.end_epoch(); tr.scores()\n"
        "assert not torch.cuda.is_initialized()\n"
    )
    root = os.path.dirname(os.path.dirname(os.path.abspath(memcore.__file__)))
    r = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("route", [{}, {"inputs": True}, {"overwrite_logits": True}])
def test_captured_training_step_records_every_replay(route):
    """A whole step (forward, accumulate, backward) in one CUDA graph: every replay records its rows
    (and input-gradient norms), as the same steps run eagerly do."""
    torch.manual_seed(0)
    n, d, c, replays = 16, 8, 5, 3
    model = torch.nn.Linear(d, c).cuda()
    x = torch.randn(n, d, device="cuda", requires_grad=True)
    y = torch.randint(0, c, (n,), device="cuda")
    idx = torch.arange(n, device="cuda")
    tr, ref = memcore.Tracker(n, device="cuda"), memcore.Tracker(n, device="cuda")

    def step(tracker):
        kw = {**route, "inputs": x} if route.get("inputs") else route
        memcore.accumulate(model(x), y, idx, tracker, **kw).backward()

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        step(tr)  # warm-up outside the capture
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step(tr)
    for _ in range(replays):
        graph.replay()
    for _ in range(1 + replays):  # the model is not updated: every step sees the same values
        step(ref)
    a, b = tr.scores(), ref.scores()
    assert int(a["rows"].sum()) == n * (1 + replays)
    keys = ["csl", "rows", "confidence_mean", "aum"] + (["input_grad_norm"] if route.get("inputs") else [])
    for k in keys:
        torch.testing.assert_close(a[k], b[k], equal_nan=True, msg=k)


def test_gemm_probe_never_runs_inside_a_capture(monkeypatch):
    """linear_accumulate's 16-bit weight-gradient GEMM depends on a probe that syncs the host: inside
    a capture it is refused with an error naming the warm-up step (before any host read), and an
    exception from the probe is never kept as the answer "unsupported". On the CPU the probe's GEMM
    (addmm with an fp32 out) raises, which is what this checks; the CUDA test below takes the real
    path."""
    like = torch.zeros(2, 2, dtype=torch.bfloat16)
    assert _C._linear_ce_gemm_form(like) == "unprobed"
    _pretend_capture(monkeypatch)
    with pytest.raises(RuntimeError, match="warm-up"):
        settle_gemm(like)
    monkeypatch.undo()
    assert _C._linear_ce_gemm_form(like) == "unprobed"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the probe's own warning, once per process
        for _ in range(2):  # each call probes again: the exception was not an answer
            assert settle_gemm(like) is False
            assert _C._linear_ce_gemm_form(like) == "unprobed"
    with pytest.raises(RuntimeError, match="float16 or bfloat16"):
        settle_gemm(like.float())


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_linear_capture_before_and_after_the_warm_up():
    """A fresh process: a bf16 linear_accumulate captured before any eager step is refused (the GEMM
    probe would sync inside the capture); after one eager step the probe's answer is kept and the
    same step captures and replays."""
    code = textwrap.dedent("""
        import torch, memcore
        from memcore import _C
        n, h, v = 8, 16, 32
        hid = torch.randn(n, h, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        w = torch.randn(v, h, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        y = torch.randint(0, v, (n,), device="cuda")
        idx = torch.arange(n, device="cuda")
        tr = memcore.Tracker(n, device="cuda")
        memcore.accumulate(torch.randn(n, 4, device="cuda"), y % 4, idx, tr)  # the tracker's warm-up
        torch.cuda.synchronize()
        try:
            with torch.cuda.graph(torch.cuda.CUDAGraph()):
                memcore.linear_accumulate(hid, w, y, idx, tr).backward()
        except RuntimeError as e:
            assert "weight-gradient GEMM" in str(e) and "warm-up" in str(e), e
        else:
            raise AssertionError("a capture before the GEMM probe was not refused")
        assert _C._linear_ce_gemm_form(hid) == "unprobed"
        memcore.linear_accumulate(hid, w, y, idx, tr).backward()  # the warm-up step
        assert _C._linear_ce_gemm_form(hid) == "fp32_accumulate"
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            memcore.linear_accumulate(hid, w, y, idx, tr).backward()
        graph.replay()
        torch.cuda.synchronize()
    """)
    root = os.path.dirname(os.path.dirname(os.path.abspath(memcore.__file__)))
    r = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
