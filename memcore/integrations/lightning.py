"""PyTorch Lightning: a callback that closes tracker epochs and stores the tracker in checkpoints.

    class Module(L.LightningModule):
        def __init__(self, tracker):
            super().__init__(); self.tracker = tracker; ...
        def training_step(self, batch, _):
            x, y, idx = batch
            return memcore.accumulate(self(x), y, idx, self.tracker)

    trainer = L.Trainer(callbacks=[MemcoreCallback(tracker)], ...)

A language model's training_step at LLM vocabulary sizes: the loss straight from the last hidden
state and the head's weight (memcore.linear_accumulate; no [B, T, V] logits are made):

        def training_step(self, batch, _):
            h = self.lm.base_model(batch["input_ids"]).last_hidden_state          # [B, T, H]
            return memcore.linear_accumulate(h[:, :-1], self.lm.lm_head.weight, batch["labels"][:, 1:],
                                             batch["sample_index"], self.tracker)

See examples/lightning_example.py.
"""

from typing import Any, Dict

try:
    from lightning.pytorch.callbacks import Callback
except ImportError:  # the older package name
    try:
        from pytorch_lightning.callbacks import Callback
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("memcore.integrations.lightning needs `pip install lightning`") from e

from ..tracker import Tracker


class MemcoreCallback(Callback):
    """Calls ``tracker.end_epoch()`` after every training epoch and saves / restores the tracker
    with Lightning's checkpoints (resumed runs give the scores of uninterrupted ones)."""

    def __init__(self, tracker: Tracker) -> None:
        self.tracker = tracker

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self.tracker.end_epoch()

    def state_dict(self) -> Dict[str, Any]:
        return self.tracker.state_dict()

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        self.tracker.load_state_dict(state_dict)
