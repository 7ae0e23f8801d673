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

import os
from typing import Any, Dict, Optional

try:
    from lightning.pytorch.callbacks import Callback
except ImportError:  # the older package name
    try:
        from pytorch_lightning.callbacks import Callback
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("memcore.integrations.lightning needs `pip install lightning`") from e

from .._checkpoint import load_from_folder, read_manifest, save_in_folder
from ..tracker import Tracker

SHARDED = "memcore_sharded_checkpoint"  # the key of a sharded tracker's entry in a Lightning checkpoint


class MemcoreCallback(Callback):
    """Calls ``tracker.end_epoch()`` after every training epoch and saves / restores the tracker
    with Lightning's checkpoints (resumed runs give the scores of uninterrupted ones).

    An unsharded tracker's state travels inside the checkpoint. A sharded one is saved as its own
    sharded checkpoint (one file per rank and a manifest) under ``shard_dir`` (default
    ``<trainer.default_root_dir>/memcore_tracker``), one folder per global step and epoch count, and
    the Lightning checkpoint holds where it is; resuming loads it at any world size. Lightning asks
    every rank for the callbacks' state when it saves, so every rank takes part in the tracker's
    collectives."""

    def __init__(self, tracker: Tracker, shard_dir: Optional[str] = None) -> None:
        self.tracker = tracker
        self.shard_dir = shard_dir
        self._saved: Optional[Dict[str, Any]] = None  # the last sharded save: (step, epochs) -> entry

    def setup(self, trainer, pl_module, stage: str) -> None:
        self._trainer = trainer
        if self.shard_dir is None:
            self.shard_dir = os.path.join(trainer.default_root_dir, "memcore_tracker")

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self.tracker.end_epoch()

    def state_dict(self) -> Dict[str, Any]:
        if not self.tracker.shard:
            return self.tracker.state_dict()
        trainer = getattr(self, "_trainer", None)
        if trainer is None:
            raise RuntimeError(
                "MemcoreCallback.state_dict() of a sharded tracker runs inside a Trainer (after setup)"
            )
        key = (trainer.global_step, self.tracker.epochs)
        if self._saved is None or self._saved["key"] != key:  # two checkpoints of one step share a save
            folder = os.path.join(self.shard_dir, f"step-{trainer.global_step}-epochs-{self.tracker.epochs}")
            path = save_in_folder(self.tracker, folder, write=trainer.is_global_zero)
            self._saved = {"key": key, "path": path, "token": read_manifest(path)["token"]}
        return {SHARDED: self._saved["path"], "token": self._saved["token"], "epochs": self.tracker.epochs}

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        if SHARDED not in state_dict:
            self.tracker.load_state_dict(state_dict)
            return
        path = state_dict[SHARDED]
        if read_manifest(path)["token"] != state_dict["token"]:
            raise ValueError(
                f"the sharded tracker checkpoint this Lightning checkpoint names, {path}, was overwritten by "
                "another save since"
            )
        load_from_folder(self.tracker, os.path.dirname(path))
