"""Unit tests of the stage-2 contrastive losses (CLIP / InfoNCE and NT-Xent) on known small cases."""

from __future__ import annotations

import math

import pytest
import torch

from training.contrastive import ContrastiveLoss, clip_loss, nt_xent_loss

torch.set_num_threads(1)


def _pairs(n: int = 6, d: int = 8, noise: float = 0.1, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(n, d, generator=g)
    return a, a + noise * torch.randn(n, d, generator=g)


@pytest.mark.parametrize("tau", [1.0, 0.5, 0.1])
def test_clip_loss_matches_hand_computation_on_orthonormal_pairs(tau: float) -> None:
    # Each row: logit 1/tau for the partner, 0 for the one other candidate.
    eye = torch.eye(2, dtype=torch.float64)
    expected = math.log(1.0 + math.exp(-1.0 / tau))
    assert clip_loss(eye, eye, tau).item() == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("tau", [1.0, 0.5, 0.1])
def test_nt_xent_matches_hand_computation_on_orthonormal_pairs(tau: float) -> None:
    # Of the 3 candidates besides itself, the partner scores 1/tau and two orthogonal vectors score 0.
    eye = torch.eye(2, dtype=torch.float64)
    expected = math.log(1.0 + 2.0 * math.exp(-1.0 / tau))
    assert nt_xent_loss(eye, eye, tau).item() == pytest.approx(expected, rel=1e-5)


def test_uninformative_embeddings_give_log_of_candidate_count() -> None:
    same = torch.ones(5, 3)
    assert clip_loss(same, same, 0.1).item() == pytest.approx(math.log(5), rel=1e-5)
    assert nt_xent_loss(same, same, 0.5).item() == pytest.approx(math.log(9), rel=1e-5)


@pytest.mark.parametrize("loss", [clip_loss, nt_xent_loss])
def test_losses_are_symmetric_in_their_two_inputs(loss) -> None:
    a, b = _pairs(noise=1.0)
    assert loss(a, b, 0.3).item() == pytest.approx(loss(b, a, 0.3).item(), rel=1e-6)


@pytest.mark.parametrize("loss", [clip_loss, nt_xent_loss])
def test_losses_ignore_embedding_scale_and_batch_order(loss) -> None:
    a, b = _pairs(noise=0.7)
    perm = torch.randperm(a.shape[0], generator=torch.Generator().manual_seed(3))
    base = loss(a, b, 0.2).item()
    assert loss(3.0 * a, 0.5 * b, 0.2).item() == pytest.approx(base, rel=1e-5)
    assert loss(a[perm], b[perm], 0.2).item() == pytest.approx(base, rel=1e-5)


@pytest.mark.parametrize("loss", [clip_loss, nt_xent_loss])
def test_lower_temperature_sharpens_matched_and_mismatched_pairs(loss) -> None:
    a, b = _pairs(noise=0.05)
    shuffled = b.roll(1, dims=0)  # every row paired with the wrong partner
    assert loss(a, b, 0.05) < loss(a, b, 0.5) < loss(a, b, 2.0)
    assert loss(a, shuffled, 0.05) > loss(a, shuffled, 0.5) > loss(a, shuffled, 2.0)


@pytest.mark.parametrize("kind", ["clip", "ntxent"])
def test_matched_pairs_score_lower_than_mismatched(kind: str) -> None:
    a, b = _pairs(noise=0.1)
    loss = ContrastiveLoss(kind, temperature=0.5)
    assert loss(a, b) < loss(a, b.roll(1, dims=0))


def test_module_uses_its_configured_kind_and_temperature() -> None:
    a, b = _pairs(noise=0.5)
    assert ContrastiveLoss("clip", 0.2)(a, b).item() == pytest.approx(clip_loss(a, b, 0.2).item(), rel=1e-5)
    assert ContrastiveLoss("ntxent", 0.5)(a, b).item() == pytest.approx(nt_xent_loss(a, b, 0.5).item(), rel=1e-5)


def test_learned_temperature_trains_and_fixed_one_does_not() -> None:
    a, b = _pairs(noise=0.05)
    learned = ContrastiveLoss("clip", temperature=0.5, learn_temperature=True)
    fixed = ContrastiveLoss("clip", temperature=0.5)
    assert [n for n, _ in learned.named_parameters()] == ["log_inv_temperature"]
    assert list(fixed.parameters()) == [] and "log_inv_temperature" in fixed.state_dict()
    opt = torch.optim.SGD(learned.parameters(), lr=0.5)
    for _ in range(5):
        opt.zero_grad()
        learned(a, b).backward()
        opt.step()
    # Well-separated pairs: the loss falls by sharpening, so the learned temperature drops.
    assert learned.temperature.item() < 0.5
    assert fixed.temperature.item() == pytest.approx(0.5)


def test_learned_temperature_is_clamped() -> None:
    loss = ContrastiveLoss("clip", temperature=1e-4, learn_temperature=True)
    assert loss.temperature.item() == pytest.approx(0.01)


def test_bad_arguments_are_refused_with_a_clear_message() -> None:
    with pytest.raises(ValueError, match="unknown contrastive loss"):
        ContrastiveLoss("triplet")
    with pytest.raises(ValueError, match="temperature"):
        ContrastiveLoss("clip", temperature=0.0)
    with pytest.raises(ValueError, match="one shape"):
        clip_loss(torch.zeros(4, 3), torch.zeros(4, 5), 0.1)
    with pytest.raises(ValueError, match="at least 2"):
        nt_xent_loss(torch.zeros(1, 3), torch.zeros(1, 3), 0.5)
