"""A small training run for torchrun (gloo, CPU), driven by tests/test_fault.py: a sharded Tracker,
a checkpoint every SAVE_EVERY steps (the tracker's shards, the model, the step) and, after a restart,
resumption from the last complete checkpoint. The final scores, gathered on rank 0, go to
``<out>/scores.pt``.

    torchrun --nproc_per_node 4 --max-restarts 1 tests/torchrun_train.py --out DIR [--kill RANK:STEP]
    torchrun --nproc_per_node 2 tests/torchrun_train.py --out DIR2 --resume-from DIR/ckpt/step-0008

The model (a linear map) is replicated: every rank computes the logits of the whole global batch and
takes the same plain SGD step on its mean loss (no DDP), and records its own share of the rows in the
tracker. Its trajectory is thus the same at any world size, and each sample is seen once per
epoch, so a run resumed at another world size ends with bitwise the same scores (``train`` with one
rank and an unsharded tracker gives the reference).
"""

import argparse
import datetime
import os
import signal

import torch
import torch.nn.functional as F

import memcore

N, C, D = 48, 4, 6  # samples, classes, features
EPOCHS, BATCH, SAVE_EVERY = 3, 8, 4  # 6 steps per epoch, 18 in all
STEPS_PER_EPOCH = N // BATCH


def data():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N, D, generator=g)
    y = torch.randint(0, C, (N,), generator=g)
    y[:5] = (y[:5] + 1) % C  # a few flipped labels
    return x, y


def batch_ids(step):
    """The sample ids of global step `step` (0-based): each epoch a fixed permutation."""
    epoch, k = divmod(step, STEPS_PER_EPOCH)
    perm = torch.randperm(N, generator=torch.Generator().manual_seed(100 + epoch))
    return perm[k * BATCH : (k + 1) * BATCH]


def train(tracker, rank, world, w, start=0, on_step=None):
    """Steps start..EPOCHS * STEPS_PER_EPOCH - 1: every rank the same model step, its share of the rows
    recorded; end_epoch() after each epoch's last step; on_step(step, w) after each step."""
    x, y = data()
    for step in range(start, EPOCHS * STEPS_PER_EPOCH):
        ids = batch_ids(step)
        wl = w.detach().requires_grad_()
        logits = x[ids] @ wl
        mine = torch.arange(rank, BATCH, world)
        memcore.accumulate(logits[mine].detach(), y[ids][mine], ids[mine], tracker)
        F.cross_entropy(logits, y[ids]).backward()
        w = (wl - 0.5 * wl.grad).detach()
        if (step + 1) % STEPS_PER_EPOCH == 0:
            tracker.end_epoch()
        if on_step is not None:
            on_step(step, w)
    return w


def main():
    import torch.distributed as dist

    from memcore import export
    from memcore._checkpoint import atomic_save

    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument(
        "--kill", default=None, help="RANK:STEP: that rank SIGKILLs itself at that step (first attempt)"
    )
    ap.add_argument("--resume-from", default=None, help="a checkpoint folder to start from")
    args = ap.parse_args()
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=30))
    rank, world = dist.get_rank(), dist.get_world_size()
    try:
        os.makedirs(os.path.join(args.out, "ckpt"), exist_ok=True)
        ckpts = os.path.join(args.out, "ckpt")
        latest = os.path.join(ckpts, "latest")
        resume = args.resume_from
        if resume is None and os.path.exists(latest):  # a restart: the last complete checkpoint
            resume = os.path.join(ckpts, open(latest).read().strip())
        tracker = memcore.Tracker(N, device="cpu", shard=True, flush_every=1)
        w, start = torch.zeros(D, C), 0
        if resume is not None:
            tracker.load(os.path.join(resume, "tracker"))
            model = torch.load(os.path.join(resume, "model.pt"), weights_only=True)
            w, start = model["w"], model["step"] + 1
        kill = None if args.kill is None else tuple(int(v) for v in args.kill.split(":"))
        attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
        if rank == 0:  # which attempts ran, and from which step
            with open(os.path.join(args.out, f"attempt-{attempt}"), "w") as f:
                f.write(str(start))

        def on_step(step, w):
            if (step + 1) % SAVE_EVERY == 0:
                folder = os.path.join(ckpts, f"step-{step:04d}")
                tracker.save(os.path.join(folder, "tracker"))  # a collective: every rank's shard
                if rank == 0:  # the model, then the pointer: a crash before it keeps the previous one
                    atomic_save({"w": w, "step": step}, os.path.join(folder, "model.pt"))
                    with open(latest + ".tmp", "w") as f:
                        f.write(os.path.basename(folder))
                    os.replace(latest + ".tmp", latest)
            if kill is not None and attempt == 0 and (rank, step) == kill:
                os.kill(os.getpid(), signal.SIGKILL)  # mid-epoch, rows recorded since the last save

        train(tracker, rank, world, w, start, on_step)
        scores = export.gather_scores(tracker)
        if rank == 0:
            atomic_save(scores, os.path.join(args.out, "scores.pt"))
    finally:
        # leaving with a live process group can abort the process at exit (gloo's threads)
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
