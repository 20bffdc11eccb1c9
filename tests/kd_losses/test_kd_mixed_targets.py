"""Hard-label targets of mixed views (issue 25): ``label``, ``label_mix``, ``lam`` -> timm's mixed one-hot with label
smoothing, used by the hard-label term of every method."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from timm.data.mixup import mixup_target

from kd_losses import build_loss
from kd_losses._common import cross_entropy, hard_target
from kd_losses.registry import available_losses


def _batch(b: int = 6, c: int = 5, lam: float | None = 0.3) -> dict:
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, c, (b,), generator=g)
    out = {"label": y, "teacher_logits": torch.randn(b, 1, c, generator=g), "index": torch.arange(b)}
    if lam is not None:
        out.update(label_mix=y.flip(0), lam=torch.full((b,), lam))
    return out


def test_hand_built_target():
    batch = {"label": torch.tensor([0, 2]), "label_mix": torch.tensor([1, 2]), "lam": torch.tensor([0.25, 1.0])}
    t = hard_target(batch["label"], 3, batch, smoothing=0.3)
    off, on = 0.1, 0.8
    expect = np.array([[0.25 * on + 0.75 * off, 0.25 * off + 0.75 * on, off], [off, off, on]])
    np.testing.assert_allclose(t.numpy(), expect, atol=1e-7)
    np.testing.assert_allclose(t.sum(1).numpy(), 1.0, atol=1e-6)


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_matches_timm_mixup_target(smoothing):
    """With one λ for the batch and the flipped batch as partners (timm's pairing), the target is timm's."""
    batch = _batch()
    ours = hard_target(batch["label"], 5, batch, smoothing)
    theirs = mixup_target(batch["label"], 5, lam=0.3, smoothing=smoothing)
    torch.testing.assert_close(ours, theirs)
    z = torch.randn(6, 5)
    expect = torch.sum(-theirs * F.log_softmax(z, dim=-1), dim=-1).mean()  # timm SoftTargetCrossEntropy
    torch.testing.assert_close(cross_entropy(z, batch["label"], batch, smoothing), expect)


def test_unmixed_batch_is_plain_cross_entropy():
    batch = _batch(lam=None)
    z = torch.randn(6, 5)
    assert torch.equal(cross_entropy(z, batch["label"], batch), F.cross_entropy(z, batch["label"]))
    ones = {**batch, "label_mix": batch["label"].flip(0), "lam": torch.ones(6)}
    torch.testing.assert_close(cross_entropy(z, batch["label"], ones), F.cross_entropy(z, batch["label"]))
    with pytest.raises(ValueError, match="label_mix"):
        cross_entropy(z, batch["label"], {**batch, "lam": torch.ones(6)})


@pytest.mark.parametrize("name", ["ce", "ls", "kd", "sl", "tfkd_self", "wsld", "dkd", "dist"])
def test_every_method_uses_the_mixed_target(name):
    """The hard-label part of a method changes with λ (and is the mixed CE where the method logs ``ce``)."""
    assert name in available_losses()
    loss = build_loss(name, num_classes=5)
    z = torch.randn(6, 5)
    a = loss(z, _batch(lam=0.3))
    b = loss(z, _batch(lam=None))
    assert not torch.isclose(a["ce"] if "ce" in a else a["loss"], b["ce"] if "ce" in b else b["loss"])
    if "ce" in a:
        mixed = _batch(lam=0.3)
        torch.testing.assert_close(a["ce"], cross_entropy(z, mixed["label"], mixed))
