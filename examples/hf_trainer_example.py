"""memcore with Hugging Face transformers: per-sequence CSL while training a (tiny, randomly
initialised, so nothing is downloaded) GPT-2 on sequences where a few have scrambled continuations.

    pip install transformers && python examples/hf_trainer_example.py
"""

import tempfile

import torch
from transformers import GPT2Config, GPT2LMHeadModel, TrainingArguments

import memcore
from memcore.eval.metrics import auroc
from memcore.integrations.huggingface import MemcoreTrainer


class Sequences(torch.utils.data.Dataset):
    """Counting sequences (t, t+1, t+2, ...) mod vocab; `odd` of them are random tokens instead."""

    def __init__(self, n=64, length=16, vocab=32, odd=6, seed=0):
        g = torch.Generator().manual_seed(seed)
        start = torch.randint(0, vocab, (n, 1), generator=g)
        self.ids = (start + torch.arange(length)) % vocab
        self.odd = torch.zeros(n, dtype=torch.bool)
        self.odd[torch.randperm(n, generator=g)[:odd]] = True
        self.ids[self.odd] = torch.randint(0, vocab, (odd, length), generator=g)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i], "sample_index": torch.tensor(i)}


def train(epochs: int = 8, overwrite_logits: bool = False, fused_linear: bool = False) -> memcore.Tracker:
    """Trains the tiny GPT-2 (seeded) with MemcoreTrainer; returns the tracker. fused_linear=True
    takes the loss from the last hidden state and the (tied) output embedding through
    memcore.linear_accumulate: the way to train at LLM vocabulary sizes, no [B, T, V] logits."""
    data = Sequences()
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=32, n_positions=16, n_embd=32, n_layer=2, n_head=2))
    tracker = memcore.Tracker(len(data))
    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(
            output_dir=out,
            num_train_epochs=epochs,
            per_device_train_batch_size=8,
            learning_rate=3e-3,
            remove_unused_columns=False,
            report_to=[],
            save_strategy="no",
            logging_strategy="no",
            use_cpu=True,
            disable_tqdm=True,
        )
        MemcoreTrainer(
            model=model,
            args=args,
            train_dataset=data,
            tracker=tracker,
            overwrite_logits=overwrite_logits,
            fused_linear=fused_linear,
        ).train()
    return tracker


def main(epochs: int = 8) -> float:
    tracker = train(epochs)
    score = auroc(tracker.scores()["csl"], Sequences().odd)
    print(f"{tracker.epochs} epochs; CSL AUROC for the scrambled sequences: {score:.4f}")
    return score


if __name__ == "__main__":
    main()
