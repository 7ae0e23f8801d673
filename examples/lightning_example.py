"""memcore with PyTorch Lightning: CSL on scikit-learn's digits with 10% flipped labels.

pip install lightning && python examples/lightning_example.py
"""

import lightning as L
import torch
from torch.utils.data import DataLoader

import memcore
from memcore.eval.corruptions import inject_label_noise
from memcore.eval.datasets import load_digits
from memcore.eval.metrics import auroc
from memcore.integrations.lightning import MemcoreCallback


class Classifier(L.LightningModule):
    def __init__(self, tracker: memcore.Tracker):
        super().__init__()
        self.tracker = tracker
        self.net = torch.nn.Sequential(
            torch.nn.Flatten(), torch.nn.Linear(64, 256), torch.nn.ReLU(), torch.nn.Linear(256, 10)
        )

    def training_step(self, batch, _):
        x, y, idx = batch
        return memcore.accumulate(self.net(x), y, idx, self.tracker)  # instead of F.cross_entropy

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)


def main(epochs: int = 30) -> float:
    data, flipped = inject_label_noise(load_digits(), 0.1, seed=0)
    tracker = memcore.Tracker(len(data))
    trainer = L.Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[MemcoreCallback(tracker)],
    )
    trainer.fit(Classifier(tracker), DataLoader(data, batch_size=64, shuffle=True))
    score = auroc(tracker.scores()["csl"], flipped)
    print(f"{tracker.epochs} epochs; CSL AUROC for the flipped labels: {score:.4f}")
    return score


if __name__ == "__main__":
    main()
