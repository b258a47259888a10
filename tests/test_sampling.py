"""Sampling: greedy at temperature 0, top-k respected, the right distribution, reproducible per row."""

from __future__ import annotations

import pytest
import torch

from csm.sampling import NoiseTables, keyed_noise, sample, sampling_inputs, seed_key, uniform_noise


def draw(logits, temperature, top_k, seeds, step=0, k_max=None, mode="mixed"):
    b = logits.shape[0]
    inputs = sampling_inputs(
        torch.full((b,), temperature),
        torch.full((b,), top_k),
        seed_key(torch.tensor(seeds)),
        torch.full((b,), step),
        1,
        k_max or top_k,
        mode,
    )
    return sample(logits, inputs, 0)


@pytest.mark.parametrize("mode", ["mixed", "greedy"])
def test_temperature_zero_is_greedy(mode):
    logits = torch.randn(8, 100)
    assert torch.equal(draw(logits, 0.0, 50, list(range(8)), mode=mode), logits.argmax(-1))


def test_mixed_batches_draw_greedy_and_sampled_rows_apart():
    logits = torch.randn(2, 100)
    inputs = sampling_inputs(
        torch.tensor([0.0, 5.0]),
        torch.tensor([10, 10]),
        seed_key(torch.tensor([1, 2])),
        torch.tensor([0, 0]),
        40,
        10,
        "mixed",
    )
    rows = torch.stack([sample(logits, inputs, n) for n in range(40)])
    assert (rows[:, 0] == logits[0].argmax()).all()
    assert len(set(rows[:, 1].tolist())) > 1  # hot temperature: the sampled row varies with the step


def test_top_k_one_is_greedy_and_samples_stay_in_the_top_k():
    logits = torch.randn(4, 200)
    assert torch.equal(draw(logits, 1.0, 1, [1, 2, 3, 4], mode="sample"), logits.argmax(-1))
    allowed = torch.topk(logits, 5).indices
    for step in range(50):
        got = draw(logits, 1.5, 5, [1, 2, 3, 4], step, mode="sample")
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
    inputs = sampling_inputs(
        torch.full((n,), 0.8),
        torch.full((n,), 4),
        seed_key(torch.arange(n)),
        torch.zeros(n).long(),
        1,
        4,
        "sample",
    )
    got = sample(logits.expand(n, 4), inputs, 0)
    freq = torch.bincount(got, minlength=4).float() / n
    expected = torch.softmax(logits[0] / 0.8, -1)
    assert (freq - expected).abs().max() < 0.03


def test_noise_depends_only_on_seed_and_step():
    steps = torch.tensor([[3], [3], [3]])
    a = uniform_noise(torch.tensor([5, 6, 7]), steps, 64)
    b = uniform_noise(torch.tensor([7]), steps[:1], 64)
    assert torch.equal(a[2], b[0])  # same (seed, step) -> same noise, whatever the batch
    assert not torch.equal(a[0], a[1])
    assert not torch.equal(b, uniform_noise(torch.tensor([7]), torch.tensor([[4]]), 64))
    assert 0 < a.min() and a.max() < 1
    big = uniform_noise(torch.tensor([2**61 + 3]), torch.arange(8)[None], 4096)
    assert abs(big.mean().item() - 0.5) < 0.01  # large seeds hash fine too


def test_a_seed_hashed_on_the_host_keys_the_same_noise():
    # The engine hashes each request's seed once, as a Python int; the noise must be the seed's.
    seeds = [0, 5, 2**32 + 7, 2**61 + 3]
    keys = seed_key(torch.tensor(seeds))
    assert keys.tolist() == [seed_key(s) for s in seeds]
    steps = torch.arange(12).view(4, 3)
    want = uniform_noise(torch.tensor(seeds), steps, 40)
    assert torch.equal(keyed_noise(keys, steps, 40), want)
    assert torch.equal(keyed_noise(keys, steps, 40, NoiseTables.make()), want)


@pytest.mark.parametrize("mode", ["sample", "mixed"])
def test_noise_tables_change_no_draw(mode):
    logits = torch.randn(3, 300)
    args = (torch.tensor([0.9, 0.0, 1.3]), torch.tensor([7, 1, 50]), seed_key(torch.tensor([4, 5, 6])))
    plain = sampling_inputs(*args, torch.tensor([0, 32, 64]), 32, 50, mode)
    tabled = sampling_inputs(*args, torch.tensor([0, 32, 64]), 32, 50, mode, NoiseTables.make())
    assert torch.equal(plain.noise, tabled.noise)
    for n in (0, 5, 31):
        assert torch.equal(sample(logits, plain, n), sample(logits, tabled, n))
