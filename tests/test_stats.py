"""Paired differences: the interval counts image sampling and seed-to-seed variation, and a verdict
is given only where it excludes zero; timing intervals resample interleaved rounds whole."""
import statistics

import pytest
import torch

from moeify.stats import paired_bootstrap, paired_difference, t_quantile


@pytest.mark.parametrize("df,value", [(1, 12.706), (2, 4.303), (4, 2.776), (30, 2.042)])
def test_t_quantiles_match_the_table(df, value):
    assert t_quantile(0.975, df) == pytest.approx(value, abs=1e-3)


def _correct(p: float, n: int, seed: int) -> torch.Tensor:
    return torch.rand(n, generator=torch.Generator().manual_seed(seed)) < p


def test_identical_models_show_no_difference():
    a = torch.stack([_correct(0.7, 500, s) for s in range(3)])
    d = paired_difference(a, a.clone())
    assert d.mean == d.low == d.high == 0 and d.verdict == "no difference shown"


def test_a_consistent_gain_is_found_and_its_interval_matches_the_normal_one():
    b = torch.stack([_correct(0.6, 1000, s) for s in range(3)])
    a = b.clone()
    a[:, :100] = True  # A right on every image B gets right, and on the first 100 whatever B did there
    gain = 100 * (a.double() - b.double())
    d = paired_difference(a, b)
    assert d.mean == pytest.approx(gain.mean().item()) and d.verdict == "above"
    assert (d.images, d.seeds) == (1000, 3)
    image_half = 1.96 * gain.mean(0).std().item() / 1000 ** 0.5
    assert d.high - d.mean >= image_half - 1e-9  # the seed part only widens it
    assert paired_difference(b, a).verdict == "below"


def test_seed_to_seed_variation_widens_the_interval():
    base = torch.stack([_correct(0.6, 2000, s) for s in range(3)])
    steady, unsteady = base.clone(), base.clone()
    steady[:, :60] = True
    for s, k in enumerate((0, 60, 120)):  # about the same mean gain, spread unevenly over the seeds
        unsteady[s, :k] = True
    one, three = paired_difference(steady, base), paired_difference(unsteady, base)
    assert three.high - three.low > one.high - one.low


def test_shapes_must_pair():
    with pytest.raises(ValueError, match="seeds, images"):
        paired_difference(torch.ones(2, 10), torch.ones(3, 10))


def test_timing_intervals_keep_rounds_paired():
    """``moeify bench``'s intervals resample whole interleaved rounds: a variant exactly twice as
    fast as dense in every round, while the machine's speed drifts 3x between rounds, gets the
    interval [2, 2] (unpaired resampling would spread it widely); the same timings give the same
    interval, and a noisy variant's interval holds its point estimate."""
    drift = torch.linspace(1.0, 3.0, 20, dtype=torch.float64)
    dense = (10 * drift).tolist()
    fast = (5 * drift).tolist()

    def speedup(c):
        return torch.quantile(c["dense"], 0.5, dim=-1) / torch.quantile(c["fast"], 0.5, dim=-1)

    low, high = paired_bootstrap({"dense": dense, "fast": fast}, speedup)
    assert low == pytest.approx(2.0) and high == pytest.approx(2.0)
    noisy = (5 * drift * (1 + 0.2 * torch.rand(20, generator=torch.Generator().manual_seed(0), dtype=torch.float64))).tolist()
    cols = {"dense": dense, "fast": noisy}
    low, high = paired_bootstrap(cols, speedup)
    assert (low, high) == paired_bootstrap(cols, speedup)
    point = statistics.median(dense) / statistics.median(noisy)
    assert low < point < high and high - low > 0.01


def test_interleaved_rounds_vary_who_runs_before_whom():
    """Each round times every function once; across rounds each function runs in several
    positions and after several different neighbours (a fixed order, or a rotated one, keeps
    one neighbour before it, and that neighbour's aftermath biases its times); the same call
    gives the same order (seeded); each function's times stay its own, one per round."""
    from moeify.bench import interleaved_rounds

    def order_of(repeats: int) -> list[list[str]]:
        calls: list[str] = []
        times = interleaved_rounds({k: (lambda k=k: calls.append(k)) for k in "abcde"}, repeats=repeats, warmup=1)
        assert set(times) == set("abcde") and all(len(v) == repeats and min(v) >= 0 for v in times.values())
        return [calls[5 + 5 * r: 10 + 5 * r] for r in range(repeats)]

    rounds = order_of(30)
    assert all(sorted(r) == list("abcde") for r in rounds)
    assert rounds == order_of(30)
    for k in "abcde":
        assert len({r.index(k) for r in rounds}) >= 4
        assert len({r[r.index(k) - 1] for r in rounds if r.index(k) > 0}) >= 3


def test_training_rows_report_the_share_of_s_dense_gain_with_paired_intervals():
    """``bench-train``'s rows: with S-Dense exactly 2x and the MoE exactly 1.5x faster than dense
    TRADES in every round while the machine drifts 3x, the MoE step is 2/3 of dense's time and
    holds half of S-Dense's gain, both with degenerate intervals (rounds resampled together);
    S-Dense holds all of its own gain, dense none."""
    from moeify.bench import _train_row

    drift = torch.linspace(1.0, 3.0, 20, dtype=torch.float64)
    rounds = {"dense TRADES": (12 * drift).tolist(), "S-Dense TRADES": (6 * drift).tolist(),
              "MoE TRADES": (8 * drift).tolist(), "MoE AdvMoE": (15 * drift).tolist()}
    rows = {k: _train_row("r", k, 4, 2, False, rounds) for k in rounds}
    moe = rows["MoE TRADES"]
    assert moe["vs_dense_trades"] == pytest.approx(2 / 3)
    assert moe["vs_dense_trades_low"] == pytest.approx(2 / 3) and moe["vs_dense_trades_high"] == pytest.approx(2 / 3)
    assert moe["of_sdense_gain"] == pytest.approx(0.5)
    assert moe["of_sdense_gain_low"] == pytest.approx(0.5) and moe["of_sdense_gain_high"] == pytest.approx(0.5)
    assert rows["S-Dense TRADES"]["of_sdense_gain"] == pytest.approx(1.0)
    assert rows["dense TRADES"]["of_sdense_gain"] == pytest.approx(0.0)
    assert rows["MoE AdvMoE"]["vs_dense_trades"] == pytest.approx(1.25)
    assert rows["MoE AdvMoE"]["of_sdense_gain"] == pytest.approx(-0.2)
