"""memcore under torch.distributed, started by torchrun (gloo on CPUs; NCCL when every rank has a GPU):

    torchrun --standalone --nproc_per_node 2 examples/torchrun_example.py          # replicated
    torchrun --standalone --nproc_per_node 2 examples/torchrun_example.py --shard  # sharded

A linear classifier trained with DistributedDataParallel and a DistributedSampler on 2,048 synthetic
points in 10 Gaussian clusters, 5% of their labels flipped. Replicated, every rank holds every
sample's statistics; with --shard each rank holds its share and rank 0 gathers the scores
(memcore.export.gather_scores). Rank 0 prints how many of the highest-CSL samples are flipped labels
and the top ids: the same for both commands, since the same data order gives the same scores however
the state is kept. Needs only torch and memcore.
"""

import argparse
import gc
import os

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, DistributedSampler

import memcore
from memcore.data import IndexedDataset


def dataset(n: int = 2048, dim: int = 16, classes: int = 10, noise: float = 0.05, seed: int = 0):
    """(IndexedDataset with flipped labels, bool flipped [n]); the same on every rank (seeded)."""
    g = torch.Generator().manual_seed(seed)
    centers = 3 * torch.randn(classes, dim, generator=g)
    y = torch.randint(0, classes, (n,), generator=g)
    x = centers[y] + torch.randn(n, dim, generator=g)
    flipped = torch.zeros(n, dtype=torch.bool)
    flipped[torch.randperm(n, generator=g)[: int(noise * n)]] = True
    shift = torch.randint(1, classes, (n,), generator=g)
    noisy = torch.where(flipped, (y + shift) % classes, y)
    return IndexedDataset(x, noisy, num_classes=classes), flipped


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shard", action="store_true", help="each rank holds only its share of the samples")
    p.add_argument("--epochs", type=int, default=5)
    args = p.parse_args()

    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank = dist.get_rank()
    device = torch.device("cuda", int(os.environ["LOCAL_RANK"])) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)

    data, flipped = dataset()
    sampler = DistributedSampler(data, shuffle=True, seed=0)  # each rank: its part of every epoch
    loader = DataLoader(data, batch_size=64, sampler=sampler)
    torch.manual_seed(0)  # the same initial weights on every rank
    model = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(data.x.shape[1], 10).to(device))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    # the whole dataset: ids are dataset indices, whichever rank sees them
    tracker = memcore.Tracker(len(data), device=device, shard=args.shard)

    for epoch in range(args.epochs):
        sampler.set_epoch(epoch)
        for x, y, idx in loader:
            x, y, idx = x.to(device), y.to(device), idx.to(device)
            loss = memcore.accumulate(model(x), y, idx, tracker)
            opt.zero_grad()
            loss.backward()
            opt.step()
        tracker.end_epoch()  # a collective: every rank calls it

    # every rank calls these too; sharded, rank 0 gets every sample's scores and the others None
    scores = memcore.export.gather_scores(tracker) if args.shard else tracker.scores()
    if rank == 0:
        k = int(flipped.sum())
        top = memcore.export.ranked_issues(scores, by="csl", top=k)
        mode = "sharded" if args.shard else "replicated"
        print(
            f"{mode} over {dist.get_world_size()} ranks, {tracker.epochs} epochs: {int(flipped[top].sum())} of the {k} highest-CSL samples are flipped labels"
        )
        print(f"top 10 by CSL: {top[:10].tolist()}")
    # DDP's reducer holds the process group and DDP modules sit in reference cycles: left to the
    # collector at interpreter exit, gloo's threads can be torn down mid-way and abort the process
    # (std::terminate) after a run that succeeded; release it first, then the group
    del model, opt
    gc.collect()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
