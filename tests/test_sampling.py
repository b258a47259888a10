"""Sampling: greedy at temperature 0, top-k respected, the right distribution, reproducible per row."""

from __future__ import annotations

import torch

from csm.sampling import sample, uniform_noise


def draw(logits, temperature, top_k, seeds, step=0, k_max=None):
    b = logits.shape[0]
    return sample(
        logits,
        torch.full((b,), temperature),
        torch.full((b,), top_k),
        k_max or top_k,
        torch.tensor(seeds),
        torch.full((b,), step),
    )


def test_temperature_zero_is_greedy():
    logits = torch.randn(8, 100)
    assert torch.equal(draw(logits, 0.0, 50, list(range(8))), logits.argmax(-1))


def test_top_k_one_is_greedy_and_samples_stay_in_the_top_k():
    logits = torch.randn(4, 200)
    assert torch.equal(draw(logits, 1.0, 1, [1, 2, 3, 4]), logits.argmax(-1))
    allowed = torch.topk(logits, 5).indices
    for step in range(50):
        got = draw(logits, 1.5, 5, [1, 2, 3, 4], step)
        assert all(got[i] in allowed[i] for i in range(4))


def test_a_rows_draw_does_not_depend_on_the_batchs_k_max():
    logits = torch.randn(3, 300)
    for step in range(20):
        assert torch.equal(
            draw(logits, 0.9, 7, [5, 6, 7], step), draw(logits, 0.9, 7, [5, 6, 7], step, k_max=60)
        )


def test_samples_follow_softmax_of_scaled_logits():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    n = 4000
    got = sample(
        logits.expand(n, 4),
        torch.full((n,), 0.8),
        torch.full((n,), 4),
        4,
        torch.arange(n),
        torch.zeros(n).long(),
    )
    freq = torch.bincount(got, minlength=4).float() / n
    expected = torch.softmax(logits[0] / 0.8, -1)
    assert (freq - expected).abs().max() < 0.03


def test_noise_depends_only_on_seed_step_and_token():
    tokens = torch.arange(64).expand(3, 64)
    a = uniform_noise(torch.tensor([5, 6, 7]), torch.tensor([3, 3, 3]), tokens)
    b = uniform_noise(torch.tensor([7]), torch.tensor([3]), tokens[:1])
    assert torch.equal(a[2], b[0])  # same (seed, step) -> same noise, whatever the batch
    assert not torch.equal(a[0], a[1])
    assert not torch.equal(b, uniform_noise(torch.tensor([7]), torch.tensor([4]), tokens[:1]))
    assert 0 < a.min() and a.max() < 1
    big = uniform_noise(torch.tensor([2**61 + 3]), torch.tensor([9]), torch.arange(20000)[None])
    assert abs(big.mean().item() - 0.5) < 0.01  # large seeds hash fine too
