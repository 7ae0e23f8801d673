"""Hugging Face transformers: per-sequence memorization scores while fine-tuning with `Trainer`.

    trainer = MemcoreTrainer(model=model, args=TrainingArguments(..., remove_unused_columns=False),
                             train_dataset=ds, tracker=memcore.Tracker(len(ds)))
    trainer.train()
    scores = trainer.tracker.scores()   # one row per sequence: csl, csl_mean (per token), ...

Each training example carries its dataset index under ``sample_index``. The loss is
``memcore.accumulate`` on the model's logits (labels shifted for causal LMs), labels -100 are
padding; ``overwrite_logits=True`` writes the gradient over the logits in training steps;
``fused_linear=True`` computes the loss from the base model's last hidden state and the output
embedding through ``memcore.linear_accumulate``, so the [B, T, V] logits never exist (LLM scale),
with the head's logit scaling and soft-capping taken from the model config (Gemma-2 / 3, Cohere,
Granite: ``head_transform``). See examples/hf_trainer_example.py.
"""

import contextlib
import os
from typing import Optional

import torch

try:
    from transformers import Trainer, TrainerCallback
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError("memcore.integrations.huggingface needs `pip install transformers`") from e

from .._checkpoint import TRACKER_FILE, load_from_folder, save_in_folder
from ..cross_entropy import accumulate
from ..linear_cross_entropy import linear_accumulate
from ..tracker import Tracker

__all__ = [
    "MemcoreCallback",
    "MemcoreTrainer",
    "TRACKER_FILE",
    "check_fused_head",
    "fused_head",
    "head_transform",
    "load_tracker",
]


class MemcoreCallback(TrainerCallback):
    """Closes tracker epochs and writes the tracker into every Trainer checkpoint folder
    (``checkpoint-*/memcore_tracker.pt``; a sharded tracker as ``checkpoint-*/memcore_tracker/``, one
    file per rank and a manifest); ``load_tracker`` restores it when resuming, at any world size for a
    sharded one. The Trainer calls the save hook on every rank: each takes part in the tracker's
    collectives, and rank 0 writes an unsharded tracker's file."""

    def __init__(self, tracker: Tracker) -> None:
        self.tracker = tracker

    def on_epoch_end(self, args, state, control, **kwargs):
        self.tracker.end_epoch()
        return control

    def on_save(self, args, state, control, **kwargs):
        folder = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
        save_in_folder(self.tracker, folder, write=state.is_world_process_zero)
        return control


class IndexCollator:
    """A data collator that keeps each example's dataset index: it takes ``index_key`` out of every
    example, lets ``collator`` build the batch from the rest (the collators of transformers and TRL
    drop keys they do not know), and adds the indices back as an int64 tensor [B].
    ``MemcoreTrainer`` wraps its trainer's collator in one, whichever it is (TRL's ``SFTTrainer``
    picks its own), so a dataset needs only an index column::

        ds = ds.add_column("sample_index", list(range(len(ds))))
    """

    def __init__(self, collator, index_key: str = "sample_index") -> None:
        self.collator = collator
        self.index_key = index_key

    def __call__(self, examples):
        missing = [i for i, e in enumerate(examples) if self.index_key not in e]
        if missing:
            raise KeyError(
                f"example {missing[0]} of the batch has no {self.index_key!r}: give every example its "
                f"dataset index, e.g. ds = ds.add_column({self.index_key!r}, list(range(len(ds))))"
            )
        index = torch.as_tensor([int(e[self.index_key]) for e in examples], dtype=torch.int64)
        batch = self.collator([{k: v for k, v in e.items() if k != self.index_key} for e in examples])
        batch[self.index_key] = index
        return batch


def load_tracker(tracker: Tracker, checkpoint_dir: str) -> None:
    """Restores the tracker saved by MemcoreCallback in a Trainer checkpoint folder (sharded: call it
    on every rank, at any world size)."""
    load_from_folder(tracker, checkpoint_dir)


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
        fused_linear: compute the loss with ``memcore.linear_accumulate`` from the base model's
            last hidden state and ``model.get_output_embeddings()`` (weight and bias; tied
            embeddings too): no [B, T, V] logits tensor, no logits gradient. Same loss, gradients
            and statistics as the default. For decoders whose logits are that linear map (Llama,
            Qwen, Mistral, GPT-2, ...), and for the heads :func:`head_transform` knows, which
            scale and soft-cap it as their forward does (Gemma-2 / 3, Cohere, Granite); other
            heads (a config attribute this model type's forward is not known to apply, a head
            that is not a plain ``nn.Linear``) are refused with a ValueError, and the first batch
            checks the last position's logits against the model's own forward. Steps that return
            outputs (evaluation with logits) use the default route.
    """

    def __init__(
        self,
        *args,
        tracker: Tracker,
        index_key: str = "sample_index",
        causal_lm: bool = True,
        overwrite_logits: bool = False,
        fused_linear: bool = False,
        **kwargs,
    ) -> None:
        super().__init__(*args, **kwargs)
        if getattr(self.args, "remove_unused_columns", False):
            raise ValueError(
                "MemcoreTrainer needs TrainingArguments(remove_unused_columns=False) so the "
                f"{index_key!r} column reaches the loss"
            )
        if getattr(self.args, "packing", False) or getattr(self.args, "padding_free", False):
            raise ValueError(
                "MemcoreTrainer scores each example as one sample: packing and padding_free merge "
                "examples into one row; set packing=False and padding_free=False"
            )
        self.tracker = tracker
        self.index_key = index_key
        self.causal_lm = causal_lm
        self.overwrite_logits = overwrite_logits
        self.fused_linear = fused_linear
        self._fused_checked = False
        if fused_linear:
            fused_head(self.model)  # refuse unsupported heads before training starts
        self.add_callback(MemcoreCallback(tracker))
        if not isinstance(self.data_collator, IndexCollator):
            self.data_collator = IndexCollator(self.data_collator, index_key)

    def compute_loss(
        self, model, inputs, return_outputs: bool = False, num_items_in_batch: Optional[int] = None
    ):
        """The model's forward, then ``memcore.accumulate``. With ``num_items_in_batch`` (the Trainer
        passes it for models that take loss kwargs, counting the labels of every micro-batch of a
        gradient-accumulation step) the loss is the token sum over that count, as the Trainer
        expects: it then does not divide by the accumulation steps itself."""
        inputs = dict(inputs)
        if self.index_key not in inputs:
            raise KeyError(
                f"batch has no {self.index_key!r}: add each example's dataset index to the dataset"
            )
        index = inputs.pop(self.index_key)
        labels = inputs.pop("labels")
        if self.fused_linear and not return_outputs:
            return self._fused_loss(model, inputs, labels, index, num_items_in_batch)
        outputs = model(**inputs)
        logits = outputs.logits
        if self.causal_lm:  # the last position predicts nothing: ignored
            labels = torch.nn.functional.pad(labels[:, 1:], (0, 1), value=-100)
        overwrite = self.overwrite_logits and model.training and not return_outputs
        # with num_items_in_batch, Trainer's contract: the token sum over the tokens of every
        # accumulated micro-batch
        reduction = "mean" if num_items_in_batch is None else "sum"
        # the classes are last ([B, T, V] or [B, C]), whatever T and V happen to be
        loss = accumulate(
            logits, labels, index, self.tracker, reduction=reduction, overwrite_logits=overwrite, class_dim=-1
        )
        if num_items_in_batch is not None:
            loss = loss / torch.as_tensor(num_items_in_batch, device=loss.device).to(loss.dtype)
        return (loss, outputs) if return_outputs else loss

    def _fused_loss(self, model, inputs, labels, index, num_items_in_batch):
        base, head = fused_head(model)
        scale, softcap = head_transform(model)
        if not self._fused_checked:
            check_fused_head(model, base, head, inputs, self.accelerator.autocast)
            self._fused_checked = True
        # accelerate runs mixed precision by wrapping the model's own forward in autocast; the base
        # model's forward is not wrapped, so it gets the same context here
        with self.accelerator.autocast():
            hidden = base(**inputs)[0]  # last_hidden_state [B, T, H]
            hidden, weight, bias = _scaled_head(hidden, head, scale)
        if self.causal_lm:
            labels = torch.nn.functional.pad(labels[:, 1:], (0, 1), value=-100)
        reduction = "mean" if num_items_in_batch is None else "sum"
        loss = linear_accumulate(
            hidden, weight, labels, index, self.tracker, bias=bias, reduction=reduction, softcap=softcap
        )
        if num_items_in_batch is not None:
            loss = loss / torch.as_tensor(num_items_in_batch, device=loss.device).to(loss.dtype)
        return loss


# The heads whose forward transforms F.linear's logits, by config model_type, as transformers'
# *ForCausalLM.forward computes them: (kind, attribute) with kind "multiply" (logits * value: Cohere's
# logit_scale, read from the model as its forward does), "divide" (logits / value: Granite's
# logits_scaling) or "softcap" (value * tanh(logits / value): Gemma-2 / 3's final_logit_softcapping,
# None for none). A config attribute of _HEAD_ATTRIBUTES on any other model type is refused: whether
# its forward applies it is not known.
_HEAD_TRANSFORMS = {
    "gemma2": ("softcap", "final_logit_softcapping"),
    "gemma3_text": ("softcap", "final_logit_softcapping"),
    "vaultgemma": ("softcap", "final_logit_softcapping"),
    "cohere": ("multiply", "logit_scale"),
    "cohere2": ("multiply", "logit_scale"),
    "granite": ("divide", "logits_scaling"),
    "granitemoe": ("divide", "logits_scaling"),
    "granitemoeshared": ("divide", "logits_scaling"),
    "granitemoehybrid": ("divide", "logits_scaling"),
}
_HEAD_ATTRIBUTES = ("final_logit_softcapping", "logit_scale", "logits_scaling")


def head_transform(model):
    """(scale, softcap) of the model's head: its logits are ``softcap * tanh(F.linear(h, W, b) * scale
    / softcap)`` (no tanh where softcap is None), as its forward computes them: the scale first, then
    the soft-capping. (None, None) for a plain linear head. ValueError for a config attribute of a
    transformed head on a model type whose forward is not known to apply it."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    known = _HEAD_TRANSFORMS.get(model_type)
    for attr in _HEAD_ATTRIBUTES:
        value = getattr(config, attr, None)
        plain = value is None or (attr != "final_logit_softcapping" and value == 1)
        if not plain and (known is None or known[1] != attr):
            raise ValueError(
                f"fused_linear=True: this model's config sets {attr}={value!r}, and memcore does not "
                f"know how {type(model).__name__}'s forward ({model_type!r}) applies it to the logits; "
                f"fused heads take it on model types {sorted(_HEAD_TRANSFORMS)}"
            )
    if known is None:
        return None, None
    kind, attr = known
    if kind == "multiply":  # Cohere's forward multiplies by its own attribute, set from the config
        value = getattr(model, attr, getattr(config, attr))
    else:
        value = getattr(config, attr)
    if value is None:
        return None, None
    value = float(value)
    if kind == "softcap":
        return None, value
    return (value if kind == "multiply" else 1.0 / value), None


def _scaled_head(hidden, head, scale):
    """(hidden, weight, bias) in hidden's dtype whose F.linear is the head's logits times scale: the
    scale goes on hidden (and bias), [N, H] rather than the [V, H] weight; the same logits up to
    rounding, and the gradient flows through the product."""
    weight = head.weight.to(hidden.dtype)
    bias = None if head.bias is None else head.bias.to(hidden.dtype)
    if scale is None or scale == 1.0:
        return hidden, weight, bias
    return hidden * scale, weight, None if bias is None else bias * scale


def fused_head(model):
    """(base model, output embedding) of a decoder whose logits are F.linear(base(...)[0], W, b), or
    that map transformed as :func:`head_transform` says; ValueError naming the reason for any other
    model."""
    if isinstance(model, torch.nn.parallel.DistributedDataParallel):
        raise ValueError(
            "fused_linear=True calls the base model directly, bypassing the "
            "DistributedDataParallel wrapper; use the default route with DDP"
        )
    head_transform(model)
    base = getattr(model, "base_model", None)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if base is None or base is model or head is None:
        raise ValueError(
            f"fused_linear=True needs a model with a base model and an output embedding "
            f"(a *ForCausalLM); {type(model).__name__} has none"
        )
    if type(head) is not torch.nn.Linear:
        raise ValueError(
            f"fused_linear=True needs the output embedding to be a plain torch.nn.Linear, "
            f"got {type(head).__name__}"
        )
    return base, head


@torch.no_grad()
def check_fused_head(model, base, head, inputs, autocast=contextlib.nullcontext) -> None:
    """Once per trainer: the model's own logits at the last position (``logits_to_keep=1``, in eval
    mode so dropout does not differ) equal F.linear of its base model's last hidden state, scaled and
    soft-capped as :func:`head_transform` says; catches heads that transform the logits in code no
    config attribute announces. Skipped for models without ``logits_to_keep`` (that check would
    materialise every position's logits)."""
    import inspect

    if "logits_to_keep" not in inspect.signature(model.forward).parameters:
        return
    was_training = model.training
    model.eval()
    try:
        want = model(**inputs, logits_to_keep=1).logits[:, -1].float()
        with autocast():
            scale, softcap = head_transform(model)
            hidden = base(**inputs)[0][:, -1]
            got = torch.nn.functional.linear(*_scaled_head(hidden, head, scale)).float()
            if softcap is not None:
                got = torch.tanh(got / softcap) * softcap
            mixed = torch.is_autocast_enabled(hidden.device.type)
    finally:
        model.train(was_training)
    exact = hidden.dtype in (torch.float32, torch.float64) and not mixed
    tol = 1e-4 if exact else 2e-2  # 16-bit logits (bf16 weights, or autocast as in bf16=True training)
    if not torch.allclose(got, want, rtol=tol, atol=tol * float(want.abs().max().clamp_min(1))):
        raise ValueError(
            f"fused_linear=True: {type(model).__name__}'s logits are not F.linear of its base "
            f"model's last hidden state (its head transforms them: largest difference "
            f"{float((got - want).abs().max()):.3g} at logits up to {float(want.abs().max()):.3g}, "
            f"{hidden.dtype}); use fused_linear=False"
        )
