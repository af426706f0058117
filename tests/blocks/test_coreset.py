import pytest
import torch

from kdad.blocks.coreset import greedy_coreset


def clusters() -> torch.Tensor:
    """20000 rows in one tight cluster and 20 rare rows far from it and from each other."""
    g = torch.Generator().manual_seed(0)
    common = torch.randn(20000, 16, generator=g) * 0.1
    rare = torch.randn(20, 16, generator=g) * 0.1 + 5 * torch.randn(20, 16, generator=g)
    return torch.cat([common, rare])


@pytest.mark.parametrize("bf16", [False, True])
def test_coreset_keeps_the_rare_rows_a_random_sample_drops(bf16: bool) -> None:
    x = clusters()
    idx = greedy_coreset(x, 200, batch=32, bf16=bf16)
    assert len(idx) == 200 and len(set(idx.tolist())) == 200
    assert torch.equal(idx, idx.sort().values)
    assert int((idx >= 20000).sum()) == 20  # every rare row; a random 1 % sample keeps none on average


def test_coreset_covers_better_than_random() -> None:
    """The largest distance from any row to its nearest chosen row (what k-centre minimises) beats random."""
    g = torch.Generator().manual_seed(1)
    x = torch.cat([torch.randn(5000, 8, generator=g), torch.randn(50, 8, generator=g) * 4])

    def radius(idx: torch.Tensor) -> float:
        return float(torch.cdist(x, x[idx]).amin(1).max())

    rnd = torch.randperm(len(x), generator=g)[:300]
    assert radius(greedy_coreset(x, 300, batch=16, dim=8)) < 0.7 * radius(rnd)


def test_textbook_greedy_with_batch_one() -> None:
    """batch=1 is the plain farthest-point rule: after any start among 50 near-equal rows, the two far ends."""
    x = torch.cat([torch.randn(50, 1) * 0.01, torch.tensor([[100.0], [-100.0]])])
    for seed in range(5):
        assert {50, 51} <= set(greedy_coreset(x, 3, batch=1, seed=seed).tolist())


def test_coreset_edges() -> None:
    x = torch.randn(10, 4)
    assert torch.equal(greedy_coreset(x, 10), torch.arange(10))
    assert torch.equal(greedy_coreset(x, 50), torch.arange(10))
    with pytest.raises(ValueError, match="positive"):
        greedy_coreset(x, 0)
