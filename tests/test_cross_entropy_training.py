"""memcore inside real training setups: autocast, gradient accumulation, causal-LM sequences."""

import torch
import torch.nn.functional as F

import memcore


def test_autocast_bf16_logits_fp64_statistics():
    lin = torch.nn.Linear(8, 6)
    x, y = torch.randn(16, 8), torch.randint(0, 6, (16,))
    tr = memcore.Tracker(16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = lin(x)
        assert logits.dtype == torch.bfloat16
        loss = memcore.accumulate(logits, y, torch.arange(16), tr)
    loss.backward()
    # float32 under autocast, as F.cross_entropy (on autocast's float32 list)
    assert loss.dtype == torch.float32 and lin.weight.grad.dtype == torch.float32
    ref = F.cross_entropy(logits.float(), y, reduction="none").double()
    s = tr.scores()
    assert s["csl"].dtype == torch.float64
    torch.testing.assert_close(s["csl"], ref.detach(), rtol=1e-5, atol=1e-5)


def test_gradient_accumulation_matches_full_batch():
    torch.manual_seed(0)
    x, y = torch.randn(32, 5), torch.randint(0, 3, (32,))
    runs = []
    for micro in (1, 4):
        torch.manual_seed(1)
        lin = torch.nn.Linear(5, 3)
        opt = torch.optim.SGD(lin.parameters(), lr=0.5)
        tr = memcore.Tracker(32)
        for _epoch in range(3):
            for step in range(2):  # 2 optimizer steps of 16 samples per epoch
                idx = torch.arange(step * 16, (step + 1) * 16)
                for part in idx.chunk(micro):
                    loss = memcore.accumulate(lin(x[part]), y[part], part, tr) / micro
                    loss.backward()
                opt.step()
                opt.zero_grad()
            tr.end_epoch()
        runs.append((tr.scores(), lin.weight.detach().clone()))
    (a, wa), (b, wb) = runs
    torch.testing.assert_close(wa, wb)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-6, atol=1e-6, equal_nan=True, msg=k)


def test_causal_lm_per_sequence_index_with_padding():
    """Shifted next-token logits [B, T-1, V], padding as ignore_index, one score per sequence."""
    torch.manual_seed(0)
    vocab, b, t = 50, 4, 7
    emb = torch.nn.Embedding(vocab, 16)
    head = torch.nn.Linear(16, vocab)
    tokens = torch.randint(0, vocab, (b, t))
    labels = tokens.clone()
    labels[1, 4:] = -100  # padding
    seq_ids = torch.tensor([10, 11, 12, 13])
    tr = memcore.Tracker(20)
    logits = head(emb(tokens))[:, :-1]
    shifted = labels[:, 1:]
    loss = memcore.accumulate(logits, shifted, seq_ids, tr)
    ref = F.cross_entropy(logits.reshape(-1, vocab), shifted.reshape(-1))
    torch.testing.assert_close(loss, ref)
    loss.backward()
    s = tr.scores()
    per_tok = F.cross_entropy(logits.reshape(-1, vocab), shifted.reshape(-1), reduction="none").view(b, t - 1)
    assert s["rows"][11] == 3 and s["rows"][10] == t - 1
    torch.testing.assert_close(s["csl"][seq_ids], per_tok.sum(1).double().detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(
        s["csl_mean"][11], per_tok[1, :3].mean().double().detach(), rtol=1e-5, atol=1e-5
    )
    assert torch.isnan(s["csl_mean"][0])
