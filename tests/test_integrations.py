"""Framework integrations; each test runs only where its framework is installed."""

import os
import runpy

import pytest

EXAMPLES = os.path.join(os.path.dirname(__file__), "..", "examples")


def _example(name):
    return runpy.run_path(os.path.join(EXAMPLES, name))


def _fit_two_epochs(L, mod, tracker, callback, root):
    """The lightning example's classifier, two epochs on digits, checkpoints under `root`."""
    import torch

    from memcore.eval.datasets import load_digits

    trainer = L.Trainer(
        max_epochs=2,
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[callback],
        default_root_dir=str(root),
    )
    trainer.fit(mod["Classifier"](tracker), torch.utils.data.DataLoader(load_digits(), batch_size=256))


@pytest.mark.slow
def test_lightning_callback_and_checkpoint(tmp_path):
    L = pytest.importorskip("lightning")
    import torch

    import memcore
    from memcore.integrations.lightning import MemcoreCallback

    mod = _example("lightning_example.py")
    assert mod["main"](epochs=15) > 0.9
    # the callback's state travels with Lightning checkpoints
    tracker = memcore.Tracker(1797)
    _fit_two_epochs(L, mod, tracker, MemcoreCallback(tracker), tmp_path)
    ckpt = (
        next((tmp_path / "checkpoints").glob("*.ckpt"))
        if (tmp_path / "checkpoints").exists()
        else next(tmp_path.rglob("*.ckpt"))
    )
    saved = torch.load(ckpt, weights_only=False)["callbacks"]
    state = next(v for k, v in saved.items() if "MemcoreCallback" in k)
    fresh = memcore.Tracker(1797)
    MemcoreCallback(fresh).load_state_dict(state)
    assert fresh.epochs == 2 and torch.equal(fresh.scores()["csl"], tracker.scores()["csl"])


@pytest.mark.slow
def test_lightning_callback_saves_a_sharded_tracker(tmp_path):
    """A sharded tracker (here a process group of one rank) travels as its own sharded checkpoint: the
    Lightning checkpoint names it, and the callback's load_state_dict restores it."""
    L = pytest.importorskip("lightning")
    import torch
    from reference import single_rank_group

    import memcore
    from memcore.integrations.lightning import SHARDED, MemcoreCallback

    mod = _example("lightning_example.py")
    with single_rank_group(str(tmp_path / "init")):
        tracker = memcore.Tracker(1797, device="cpu", shard=True)
        _fit_two_epochs(L, mod, tracker, MemcoreCallback(tracker), tmp_path)
        ckpt = next(tmp_path.rglob("*.ckpt"))
        saved = torch.load(ckpt, weights_only=False)["callbacks"]
        state = next(v for k, v in saved.items() if "MemcoreCallback" in k)
        assert state["epochs"] == 2 and os.path.isfile(os.path.join(state[SHARDED], "manifest.json"))
        assert state[SHARDED].startswith(str(tmp_path / "memcore_tracker"))
        fresh = memcore.Tracker(1797, device="cpu", shard=True)
        MemcoreCallback(fresh).load_state_dict(state)
        assert fresh.epochs == 2 and torch.equal(fresh.scores()["csl"], tracker.scores()["csl"])


@pytest.mark.slow
def test_hf_trainer(tmp_path):
    pytest.importorskip("transformers")
    mod = _example("hf_trainer_example.py")
    assert mod["main"](epochs=6) > 0.8


@pytest.mark.slow
def test_hf_trainer_overwrite_logits_same_scores():
    """overwrite_logits=True trains the same model: the same per-sequence statistics."""
    pytest.importorskip("transformers")
    import torch

    mod = _example("hf_trainer_example.py")
    a = mod["train"](epochs=2).scores()
    b = mod["train"](epochs=2, overwrite_logits=True).scores()
    assert a["rows"].sum() > 0
    torch.testing.assert_close(b["csl"], a["csl"], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(b["rows"], a["rows"])


def test_hf_compute_loss_follows_num_items_in_batch(tmp_path):
    """With gradient accumulation the Trainer passes num_items_in_batch (tokens over all micro-batches)
    and, for models taking loss kwargs, does not divide the loss itself: compute_loss must return the
    token sum over that count, else the gradient is accumulation-steps times too large."""
    pytest.importorskip("transformers")
    import torch
    import torch.nn.functional as F
    from transformers import GPT2Config, GPT2LMHeadModel, TrainingArguments

    import memcore
    from memcore.integrations.huggingface import MemcoreTrainer

    mod = _example("hf_trainer_example.py")
    data = mod["Sequences"]()
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=32, n_positions=16, n_embd=16, n_layer=1, n_head=2))
    args = TrainingArguments(
        output_dir=str(tmp_path),
        remove_unused_columns=False,
        report_to=[],
        use_cpu=True,
        gradient_accumulation_steps=2,
    )
    trainer = MemcoreTrainer(model=model, args=args, train_dataset=data, tracker=memcore.Tracker(len(data)))
    batch = {k: torch.stack([data[i][k] for i in range(4)]) for k in ("input_ids", "labels", "sample_index")}
    batch["labels"][0, -5:] = -100
    model.eval()  # no dropout: the reference and compute_loss see the same logits
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"]).logits
    shifted = batch["labels"][:, 1:]
    token_sum = F.cross_entropy(logits[:, :-1].reshape(-1, 32), shifted.reshape(-1), reduction="sum")
    got = trainer.compute_loss(model, dict(batch), num_items_in_batch=torch.tensor(100))
    torch.testing.assert_close(got, token_sum / 100)
    mean = trainer.compute_loss(model, dict(batch))
    torch.testing.assert_close(mean, token_sum / shifted.ne(-100).sum())


def test_hf_trainer_requires_index_column():
    pytest.importorskip("transformers")
    from transformers import TrainingArguments

    import memcore
    from memcore.integrations.huggingface import MemcoreTrainer

    mod = _example("hf_trainer_example.py")
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(vocab_size=32, n_positions=16, n_embd=16, n_layer=1, n_head=2))
    args = TrainingArguments(output_dir="/tmp/memcore-hf-x", report_to=[], use_cpu=True)
    with pytest.raises(ValueError, match="remove_unused_columns=False"):
        MemcoreTrainer(model=model, args=args, train_dataset=mod["Sequences"](), tracker=memcore.Tracker(64))


def test_hf_index_collator_restores_the_index_and_names_a_missing_one():
    pytest.importorskip("transformers")
    import torch
    from transformers import default_data_collator

    from memcore.integrations.huggingface import IndexCollator

    seen = []

    def drops_unknown_keys(examples):  # as the collators of transformers and TRL do
        seen.append([sorted(e) for e in examples])
        return default_data_collator([{"input_ids": e["input_ids"]} for e in examples])

    collate = IndexCollator(drops_unknown_keys)
    batch = collate([{"input_ids": [1, 2], "sample_index": 7}, {"input_ids": [3, 4], "sample_index": 2}])
    assert seen == [[["input_ids"], ["input_ids"]]]  # the wrapped collator never sees the index
    assert batch["sample_index"].dtype == torch.int64 and batch["sample_index"].tolist() == [7, 2]
    assert batch["input_ids"].tolist() == [[1, 2], [3, 4]]
    with pytest.raises(KeyError, match="example 1 of the batch has no 'sample_index'"):
        collate([{"input_ids": [1], "sample_index": 0}, {"input_ids": [2]}])


def test_hf_compute_loss_when_sequence_length_equals_vocabulary():
    """[B, T, V] logits with T == V fit F.cross_entropy's class-dim-1 reading too: the trainer says
    the classes are last, so such a model trains instead of hitting the ambiguity error."""
    pytest.importorskip("transformers")
    import torch
    import torch.nn.functional as F
    from transformers import GPT2Config, GPT2LMHeadModel, TrainingArguments

    import memcore
    from memcore.integrations.huggingface import MemcoreTrainer

    data = _example("hf_trainer_example.py")["Sequences"](n=8, length=16, vocab=16)
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=16, n_positions=16, n_embd=16, n_layer=1, n_head=2)).eval()
    args = TrainingArguments(output_dir="unused", remove_unused_columns=False, report_to=[], use_cpu=True)
    trainer = MemcoreTrainer(model=model, args=args, train_dataset=data, tracker=memcore.Tracker(len(data)))
    batch = {k: torch.stack([data[i][k] for i in range(4)]) for k in ("input_ids", "labels", "sample_index")}
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"]).logits
    want = F.cross_entropy(logits[:, :-1].reshape(-1, 16), batch["labels"][:, 1:].reshape(-1))
    torch.testing.assert_close(trainer.compute_loss(model, dict(batch)), want)
