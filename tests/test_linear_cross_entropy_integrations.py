"""MemcoreTrainer(fused_linear=True): the loss through memcore.linear_accumulate from the base model's
last hidden state and the output embedding. Tiny randomly initialised models, nothing downloaded."""

import copy
import os
import runpy

import pytest
import torch

transformers = pytest.importorskip("transformers")

from reference import recorded  # noqa: E402

import memcore  # noqa: E402
from memcore.integrations.huggingface import MemcoreTrainer, fused_head, head_transform  # noqa: E402

EXAMPLES = os.path.join(os.path.dirname(__file__), "..", "examples")
VOCAB = 61  # odd


def _sizes(hidden, layers, **extra):
    """A tiny decoder config's keyword arguments: hidden size, layers, 2 heads sharing 1 KV head."""
    return dict(
        vocab_size=VOCAB,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=32,
        **extra,
    )


def _model(kind, **extra):
    t = transformers
    torch.manual_seed(0)
    if kind == "gpt2":  # tied input / output embeddings
        return t.GPT2LMHeadModel(
            t.GPT2Config(vocab_size=VOCAB, n_positions=32, n_embd=16, n_layer=1, n_head=2, **extra)
        )
    common = _sizes(16, 1, **extra)
    cls = {
        "llama": (t.LlamaConfig, t.LlamaForCausalLM),
        "qwen2": (t.Qwen2Config, t.Qwen2ForCausalLM),
        "mistral": (t.MistralConfig, t.MistralForCausalLM),
    }[kind]
    return cls[1](cls[0](**common))


def _batch():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, VOCAB, (4, 12), generator=g)
    labels = ids.clone()
    labels[1, 8:] = -100  # padding
    return {"input_ids": ids, "labels": labels, "sample_index": torch.tensor([5, 0, 3, 1])}


def _trainer(model, tmp_path, **kw):
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), remove_unused_columns=False, report_to=[], use_cpu=True
    )
    return MemcoreTrainer(model=model, args=args, tracker=memcore.Tracker(6), **kw)


@pytest.mark.parametrize("kind", ["llama", "qwen2", "mistral", "gpt2"])
@pytest.mark.parametrize("num_items", [None, 37])
def test_fused_trainer_matches_unfused(kind, num_items, tmp_path):
    model = _model(kind).eval()  # no dropout: both routes see the same hidden states
    results = []
    for fused in (False, True):
        m = copy.deepcopy(model)
        trainer = _trainer(m, tmp_path, fused_linear=fused)
        kwargs = {} if num_items is None else {"num_items_in_batch": torch.tensor(num_items)}
        loss = trainer.compute_loss(m, _batch(), **kwargs)
        loss.backward()
        grads = {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}
        results.append((loss.detach(), grads, trainer.tracker.scores()))
    (l0, g0, s0), (l1, g1, s1) = results
    torch.testing.assert_close(l1, l0, rtol=1e-5, atol=1e-6)
    assert g0.keys() == g1.keys() and len(g0) > 0
    for name in g0:
        torch.testing.assert_close(g1[name], g0[name], rtol=1e-4, atol=1e-6, msg=name)
    for key in ("csl", "rows", "confidence_mean", "aum"):
        torch.testing.assert_close(s1[key], s0[key], rtol=1e-5, atol=1e-6, equal_nan=True)
    assert s1["rows"].sum() == _batch()["labels"][:, 1:].ne(-100).sum()


@pytest.mark.slow
def test_fused_trainer_trains_like_unfused():
    """A whole Trainer run (examples/hf_trainer_example.py, tied GPT-2 with dropout): the same scores."""
    mod = runpy.run_path(os.path.join(EXAMPLES, "hf_trainer_example.py"))
    a = mod["train"](epochs=2).scores()
    b = mod["train"](epochs=2, fused_linear=True).scores()
    assert a["rows"].sum() > 0
    torch.testing.assert_close(b["csl"], a["csl"], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(b["rows"], a["rows"])


HEADS = {  # tiny random models whose heads transform F.linear's logits
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", dict(head_dim=16, final_logit_softcapping=2.0)),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", dict(head_dim=16, final_logit_softcapping=2.0)),
    "cohere": ("CohereConfig", "CohereForCausalLM", dict(logit_scale=0.3)),
    "cohere_pow2": ("CohereConfig", "CohereForCausalLM", dict(logit_scale=0.0625)),  # Cohere's default
    "granite": ("GraniteConfig", "GraniteForCausalLM", dict(logits_scaling=3.0)),
}


def _head_model(kind):
    config_cls, model_cls, extra = HEADS[kind]
    if not hasattr(transformers, model_cls):
        pytest.skip(f"this transformers has no {model_cls}")
    torch.manual_seed(0)
    # initializer_range: logits of a few units, so the soft-capping at 2 matters
    special = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2)
    config = getattr(transformers, config_cls)(**_sizes(32, 2, initializer_range=0.5, **special, **extra))
    return getattr(transformers, model_cls)(config).eval()


@pytest.mark.parametrize("kind", sorted(HEADS))
def test_fused_trainer_takes_softcap_and_logit_scale(kind, tmp_path):
    """Gemma-2 / 3's final_logit_softcapping and Cohere's / Granite's logit scaling come from the
    model config: the fused trainer's loss, every parameter's gradient and the statistics are the
    unfused trainer's, whose model applies them in its forward. Both routes run the same base model
    (the same hidden states); their logits differ by the two GEMMs' fp32 rounding (H terms:
    H u sum |h W| ~ 32 * 6e-8 of the logits' scale) and the scale's (two roundings of 2^-24), so
    every gradient, linear in the logits' gradient, differs by a few 1e-6 of its size: rtol 1e-4
    (as for the plain heads above) leaves a margin of 10x for the backward through the layers."""
    model = _head_model(kind)
    results = []
    for fused in (False, True):
        m = copy.deepcopy(model)
        trainer = _trainer(m, tmp_path, fused_linear=fused)
        loss = trainer.compute_loss(m, _batch())
        loss.backward()
        grads = {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}
        results.append((loss.detach(), grads, trainer.tracker))
    (l0, g0, t0), (l1, g1, t1) = results
    torch.testing.assert_close(l1, l0, rtol=1e-5, atol=1e-6)
    assert g0.keys() == g1.keys() and len(g0) == len(list(model.parameters()))
    for name in g0:
        torch.testing.assert_close(g1[name], g0[name], rtol=1e-4, atol=1e-6, msg=name)
    torch.testing.assert_close(recorded(t1), recorded(t0), rtol=1e-5, atol=1e-6)
    assert t1.scores()["rows"].sum() == _batch()["labels"][:, 1:].ne(-100).sum()
    # the transform matters: without it the loss is another one
    base, head = fused_head(model)
    with torch.no_grad():
        plain = torch.nn.functional.linear(base(input_ids=_batch()["input_ids"])[0], head.weight)
        labels = torch.nn.functional.pad(_batch()["labels"][:, 1:], (0, 1), value=-100)
        other = torch.nn.functional.cross_entropy(plain.flatten(0, 1), labels.flatten())
    assert abs(float(other) - float(l0)) > 1e-2


def test_head_transform_reads_the_forward_order():
    """(scale, softcap) as each forward computes its logits: Cohere multiplies by its own
    logit_scale attribute, Granite divides by the config's logits_scaling, Gemma soft-caps."""
    assert head_transform(_head_model("gemma2")) == (None, 2.0)
    assert head_transform(_head_model("cohere")) == (0.3, None)
    assert head_transform(_head_model("granite")) == (1.0 / 3.0, None)
    assert head_transform(_model("llama")) == (None, None)
    gemma = _head_model("gemma2")
    gemma.config.final_logit_softcapping = None  # Gemma-2 without soft-capping: a plain head
    assert head_transform(gemma) == (None, None)


def test_fused_trainer_refuses_transformed_heads(tmp_path):
    # a config attribute on a model type whose forward is not known to apply it
    with pytest.raises(ValueError, match="final_logit_softcapping=30.0"):
        _trainer(_model("llama", final_logit_softcapping=30.0), tmp_path, fused_linear=True)
    with pytest.raises(ValueError, match="logit_scale=0.5"):
        _trainer(_model("llama", logit_scale=0.5), tmp_path, fused_linear=True)

    class ScaledHead(transformers.LlamaForCausalLM):  # scales its logits in code, no config flag
        def forward(self, input_ids=None, logits_to_keep=0, **kw):
            out = super().forward(input_ids=input_ids, logits_to_keep=logits_to_keep, **kw)
            out.logits = out.logits * 2
            return out

    model = ScaledHead(_model("llama").config)
    trainer = _trainer(model, tmp_path, fused_linear=True)
    with pytest.raises(ValueError, match="logits are not F.linear"):
        trainer.compute_loss(model, _batch())


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["llama", "gemma2"])
def test_trl_sft_trainer_two_line_pattern(kind, tmp_path):
    """TRL's SFTTrainer is a Trainer subclass: `class MemcoreSFTTrainer(MemcoreTrainer, SFTTrainer)`
    gives it memcore's (fused) loss, on a pre-tokenised dataset with a sample_index column, through
    TRL's own collator (MemcoreTrainer keeps the index column past it); a soft-capped Gemma-2 head
    too."""
    trl = pytest.importorskip("trl")
    from datasets import Dataset

    class MemcoreSFTTrainer(MemcoreTrainer, trl.SFTTrainer):
        pass

    model = _model("llama") if kind == "llama" else _head_model(kind).train()
    g = torch.Generator().manual_seed(2)
    rows = [
        {"input_ids": torch.randint(0, VOCAB, (10,), generator=g).tolist(), "sample_index": i}
        for i in range(8)
    ]
    kwargs = dict(
        output_dir=str(tmp_path),
        remove_unused_columns=False,
        report_to=[],
        use_cpu=True,
        max_steps=2,
        per_device_train_batch_size=4,
        save_strategy="no",
        logging_strategy="no",
        disable_tqdm=True,
        dataset_kwargs={"skip_prepare_dataset": True},
    )
    config = trl.SFTConfig(**kwargs)
    tracker = memcore.Tracker(8)
    trainer = MemcoreSFTTrainer(
        model=model,
        args=config,
        train_dataset=Dataset.from_list(rows),
        processing_class=_tokenizer(),
        tracker=tracker,
        fused_linear=True,
    )
    trainer.train()
    assert tracker.scores()["rows"].sum() == 8 * 9  # every sequence once, 9 predicted tokens each
    packed = trl.SFTConfig(**kwargs, packing=True, max_length=32)
    with pytest.raises(ValueError, match="packing and padding_free merge examples"):
        MemcoreSFTTrainer(
            model=model,
            args=packed,
            train_dataset=Dataset.from_list(rows),
            processing_class=_tokenizer(),
            tracker=tracker,
        )


def _tokenizer():
    """A word-level tokenizer built in memory (SFTTrainer wants a processing class)."""
    from tokenizers import Tokenizer, models

    vocab = {f"t{i}": i for i in range(VOCAB - 1)}
    vocab["<pad>"] = VOCAB - 1
    tok = transformers.PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="<pad>")),
        pad_token="<pad>",
        eos_token="<pad>",
    )
    return tok
