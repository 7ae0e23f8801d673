"""Plain-PyTorch reference of what memcore's kernels compute, for the tests."""

import contextlib

import torch
import torch.nn.functional as F


def row_stats(logits, targets, ignore_index=-100):
    """Per-row loss, p(target), margin, correct for non-ignored rows (float64 math)."""
    z = logits.double()
    keep = targets != ignore_index
    z, t = z[keep], targets[keep]
    loss = F.cross_entropy(z, t, reduction="none")
    p = torch.exp(-loss)
    zt = z.gather(1, t[:, None]).squeeze(1)
    other = z.scatter(1, t[:, None], float("-inf")).amax(1)
    correct = (z.argmax(1) == t).double()
    return keep, loss, p, zt - other, correct


def epoch_sums(batches, num_samples, ignore_index=-100):
    """[S, 6] float64 sums over the batches (logits, targets, index), like memcore's epoch buffer."""
    out = torch.zeros(num_samples, 6, dtype=torch.float64)
    for logits, targets, index in batches:
        keep, loss, p, margin, correct = row_stats(logits.cpu(), targets.cpu(), ignore_index)
        ix = index.cpu()[keep]
        cols = torch.stack([loss, torch.ones_like(loss), correct, p, p * p, margin], 1)
        out.index_add_(0, ix, cols)
    return out


def scores(epochs, num_samples, ignore_index=-100):
    """Reference scores for a list of epochs, each a list of (logits, targets, index) batches."""
    total = torch.zeros(num_samples, 6, dtype=torch.float64)
    last_loss = torch.full((num_samples,), float("nan"), dtype=torch.float64)
    prev = [None] * num_samples
    forgetting = [0] * num_samples
    learned = [-1] * num_samples
    ever = [False] * num_samples  # correct in some epoch it was seen
    for e, batches in enumerate(epochs):
        s = epoch_sums(batches, num_samples, ignore_index)
        total += s
        for i in range(num_samples):
            rows = s[i, 1].item()
            if rows == 0:
                continue
            c = s[i, 2].item() >= rows - 1e-9
            last_loss[i] = s[i, 0] / rows
            if prev[i] and not c:
                forgetting[i] += 1
            ever[i] = ever[i] or c
            if c and learned[i] < 0:
                learned[i] = e
            if not c:
                learned[i] = -1
            prev[i] = c
    rows = total[:, 1]
    nan = torch.full_like(rows, float("nan"))
    mean = lambda col: torch.where(rows > 0, total[:, col] / rows.clamp_min(1), nan)
    conf = mean(3)
    lt = torch.tensor([e if e >= 0 else len(epochs) for e in learned], dtype=torch.float64)
    return {
        "csl": total[:, 0],
        "csl_mean": mean(0),
        "rows": rows,
        "last_loss": last_loss,
        "learning_time": torch.where(rows > 0, lt, nan),
        # Toneva et al.: a sample never classified correctly is forgotten infinitely often
        "forgetting": torch.where(
            rows > 0,
            torch.tensor([f if e else float("inf") for f, e in zip(forgetting, ever)], dtype=torch.float64),
            nan,
        ),
        "forgetting_events": torch.tensor(forgetting, dtype=torch.float64),
        "confidence_mean": conf,
        "confidence_std": (mean(4) - conf * conf).clamp_min(0).sqrt(),
        "aum": mean(5),
        "correctness": mean(2),
    }


def assert_same_state(a, b):
    """Two Tracker.state_dict()s are equal, bitwise for every tensor."""
    assert a.keys() == b.keys()
    for k in a:
        if k == "buffers":
            assert a[k].keys() == b[k].keys()
            for name in a[k]:
                x, y = a[k][name], b[k][name]
                assert x.dtype == y.dtype and x.shape == y.shape, name
                assert torch.equal(
                    x.view(torch.uint8) if x.dtype != torch.bool else x,
                    y.view(torch.uint8) if y.dtype != torch.bool else y,
                ), name
        elif k == "grad_history":
            assert len(a[k]) == len(b[k])
            assert all(torch.equal(x.view(torch.int32), y.view(torch.int32)) for x, y in zip(a[k], b[k]))
        else:
            assert a[k] == b[k], k


def trained_tracker(n=12, epochs=2, seed=0, inputs=False, tau=None):
    """A Tracker after `epochs` closed epochs of random batches (with input gradients if `inputs`) and
    one open epoch."""
    import memcore

    g = torch.Generator().manual_seed(seed)
    tr = memcore.Tracker(n, tau=tau)
    w = torch.randn(5, 4, generator=g)
    for _ in range(epochs):
        x = torch.randn(n, 5, generator=g).requires_grad_()
        y = torch.randint(0, 4, (n,), generator=g)
        loss = memcore.accumulate(x @ w, y, torch.arange(n), tr, inputs=x if inputs else None)
        if inputs:
            loss.backward()
        tr.end_epoch()
    memcore.accumulate(
        torch.randn(n, 4, generator=g), torch.randint(0, 4, (n,), generator=g), torch.arange(n), tr
    )
    return tr


def random_batches(n, c, num_samples, nb, scale=2.0, gen=None):
    """nb batches (logits [n, c], targets, index): random ids, so ids repeat within and across batches."""
    out = []
    for _ in range(nb):
        logits = torch.randn(n, c, generator=gen) * scale
        targets = torch.randint(0, c, (n,), generator=gen)
        index = torch.randint(0, num_samples, (n,), generator=gen)
        out.append((logits, targets, index))
    return out


def run_tracker(epochs, num_samples, device, **kw):
    """A Tracker(num_samples, device, **kw) fed each epoch's batches (logits, targets, index), each
    epoch closed."""
    import memcore

    tr = memcore.Tracker(num_samples, device=device, **kw)
    for batches in epochs:
        for logits, targets, index in batches:
            memcore.accumulate(logits.to(device), targets.to(device), index.to(device), tr)
        tr.end_epoch()
    return tr


def run_concurrently(fn, n):
    """Runs fn() in n threads that start together (a barrier); returns the exceptions they raised."""
    import threading

    start, errors = threading.Barrier(n), []

    def worker():
        try:
            start.wait()
            fn()
        except Exception as e:  # noqa: BLE001 - returned for the caller's assertion
            errors.append(e)

    threads = [threading.Thread(target=worker) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return errors


def init_gloo(rank, world, init_file, timeout_s=60):
    """A gloo process group over a file rendezvous: a collective that waits longer than timeout_s
    fails instead of hanging."""
    import datetime

    import torch.distributed as dist

    dist.init_process_group(
        "gloo",
        init_method=f"file://{init_file}",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=timeout_s),
    )


@contextlib.contextmanager
def single_rank_group(init_file):
    """A gloo process group of world size 1 in this process (a sharded Tracker needs one), destroyed
    on exit."""
    import torch.distributed as dist

    init_gloo(0, 1, init_file)
    try:
        yield
    finally:
        dist.destroy_process_group()


def recorded(tracker):
    """Every value a tracker has accumulated (sums, counts, input-gradient sums) as one float64
    tensor, read through the public state_dict(): zero for a fresh tracker, unchanged by a rejected
    batch."""
    bufs = tracker.state_dict()["buffers"]
    keys = [k for k in ("sums", "counts", "grad_sq_sum", "grad_rows") if k in bufs]
    return torch.cat([bufs[k].double().flatten() for k in keys])


def options_reference(z, t, ignore_index, cap, eps, w, a, b, c):
    """ce_forward_options's and ce_backward_options's contracts in float64 torch ops: per-row nll and
    smooth (-sum_j u_j log p_j) and the gradient (a p - b onehot - c u) * dz'/dz; ignored rows 0."""
    z = z.double()
    if cap:
        z = torch.tanh(z / cap) * cap
    keep = t != ignore_index
    ts = torch.where(keep, t, 0)
    logp = torch.log_softmax(z, 1)
    u = torch.ones(z.shape[1], dtype=torch.float64) if w is None else w.double()
    nll = torch.where(keep, -logp.gather(1, ts[:, None])[:, 0], 0.0)
    smooth = torch.where(keep, -(logp * u).sum(1), 0.0)
    onehot = F.one_hot(ts, z.shape[1]).double()
    grad = a.double()[:, None] * logp.exp() - b.double()[:, None] * onehot
    if c.numel():
        grad = grad - c.double()[:, None] * u
    if cap:
        grad = grad * (1 - (z / cap) ** 2)
    return nll, smooth, torch.where(keep[:, None], grad, 0.0)
