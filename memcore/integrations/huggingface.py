"""Hugging Face transformers: per-sequence memorization scores while fine-tuning with `Trainer`.

    trainer = MemcoreTrainer(model=model, args=TrainingArguments(..., remove_unused_columns=False),
                             train_dataset=ds, tracker=memcore.Tracker(len(ds)))
    trainer.train()
    scores = trainer.tracker.scores()   # one row per sequence: csl, csl_mean (per token), ...

Each training example carries its dataset index under ``sample_index``. The loss is
``memcore.accumulate`` on the model's logits (labels shifted for causal LMs), labels -100 are
padding; ``overwrite_logits=True`` writes the gradient over the logits in training steps.
See examples/hf_trainer_example.py.
"""
import os
from typing import Optional

import torch

try:
    from transformers import Trainer, TrainerCallback
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError("memcore.integrations.huggingface needs `pip install transformers`") from e

from .._io import atomic_save, load_plain
from ..accumulate import accumulate
from ..tracker import Tracker

TRACKER_FILE = "memcore_tracker.pt"


class MemcoreCallback(TrainerCallback):
    """Closes tracker epochs and writes the tracker into every Trainer checkpoint folder
    (``checkpoint-*/memcore_tracker.pt``); ``load_tracker`` restores it when resuming."""

    def __init__(self, tracker: Tracker) -> None:
        self.tracker = tracker

    def on_epoch_end(self, args, state, control, **kwargs):
        self.tracker.end_epoch()
        return control

    def on_save(self, args, state, control, **kwargs):
        folder = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
        if os.path.isdir(folder):
            atomic_save(self.tracker.state_dict(), os.path.join(folder, TRACKER_FILE))
        return control


def load_tracker(tracker: Tracker, checkpoint_dir: str) -> None:
    """Restores the tracker saved by MemcoreCallback in a Trainer checkpoint folder."""
    tracker.load_state_dict(load_plain(os.path.join(checkpoint_dir, TRACKER_FILE), "memcore Tracker checkpoint"))


class MemcoreTrainer(Trainer):
    """A Trainer whose loss is ``memcore.accumulate``: records per-sequence statistics.

    Args:
        tracker: receives the statistics; ``num_samples`` = size of the training set.
        index_key: batch key holding each example's dataset index (removed before the forward).
        causal_lm: next-token prediction: position t's logits are scored against token t+1 (the
            labels are shifted, not the logits, so the [B, T, V] logits are never copied).
        overwrite_logits: pass ``overwrite_logits=True`` to ``memcore.accumulate`` in training
            steps (the gradient is written over the logits in the forward pass: one N x V buffer
            less; see ``memcore.accumulate``). When the Trainer normalises by its token count
            (``num_items_in_batch``) the backward scales the gradient in one pass, so the saving
            is the memory, not a pass. Evaluation steps, which return the logits, keep them.
    """

    def __init__(self, *args, tracker: Tracker, index_key: str = "sample_index", causal_lm: bool = True,
                 overwrite_logits: bool = False, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if getattr(self.args, "remove_unused_columns", False):
            raise ValueError("MemcoreTrainer needs TrainingArguments(remove_unused_columns=False) so the "
                             f"{index_key!r} column reaches the loss")
        self.tracker = tracker
        self.index_key = index_key
        self.causal_lm = causal_lm
        self.overwrite_logits = overwrite_logits
        self.add_callback(MemcoreCallback(tracker))

    def compute_loss(self, model, inputs, return_outputs: bool = False, num_items_in_batch: Optional[int] = None):
        """The model's forward, then ``memcore.accumulate``. With ``num_items_in_batch`` (the Trainer
        passes it for models that take loss kwargs, counting the labels of every micro-batch of a
        gradient-accumulation step) the loss is the token sum over that count, as the Trainer
        expects: it then does not divide by the accumulation steps itself."""
        inputs = dict(inputs)
        if self.index_key not in inputs:
            raise KeyError(f"batch has no {self.index_key!r}: add each example's dataset index to the dataset")
        index = inputs.pop(self.index_key)
        labels = inputs.pop("labels")
        outputs = model(**inputs)
        logits = outputs.logits
        if self.causal_lm:  # the last position predicts nothing: ignored
            labels = torch.nn.functional.pad(labels[:, 1:], (0, 1), value=-100)
        overwrite = self.overwrite_logits and model.training and not return_outputs
        # with num_items_in_batch, Trainer's contract: the token sum over the tokens of every
        # accumulated micro-batch
        reduction = "mean" if num_items_in_batch is None else "sum"
        loss = accumulate(logits, labels, index, self.tracker, reduction=reduction, overwrite_logits=overwrite)
        if num_items_in_batch is not None:
            loss = loss / torch.as_tensor(num_items_in_batch, device=loss.device).to(loss.dtype)
        return (loss, outputs) if return_outputs else loss
