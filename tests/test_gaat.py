"""GAAT (reconstruction): the Taylor gradient approximation against exact gradients where the answer is known, the
attack's cost accounting, carried perturbations that follow their example through crops and flips, and resume."""
from __future__ import annotations

import os
import signal

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from advtrain.attacks import PassCounter, pgd
from advtrain.attacks.taylor import Anchor, taylor_gradient
from advtrain.config import ConfigError, check_config
from advtrain.data.augment import apply_augmentation, invert_augmentation, sample_augmentation
from advtrain.engine.run import train
from advtrain.engine.signals import Interrupted
from advtrain.methods.gaat import GAAT
from advtrain.schema import TRAIN_SECTIONS
from conftest import compose_train

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: 1 thread, restored afterwards

SYNTH = ["dataset=synthetic", "arch=mnist_net", "logger=none", "trainer.progress=off", "dataset.n_train=512",
         "dataset.n_test=64", "trainer.batch_size=48", "attack=[]", "dataset.crop_padding=2", "dataset.flip=true",
         "method=gaat"]


def run(run_dir, overrides):
    return train(check_config(compose_train(SYNTH + overrides), TRAIN_SECTIONS), run_dir)


def _grad(loss_fn, delta):
    delta = delta.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(loss_fn(delta).sum(), delta)
    return g


def test_taylor_gradient_is_exact_for_a_loss_linear_in_its_input():
    w = torch.randn(1, 3, 4, 4)
    loss = lambda d: (w * d).flatten(1).sum(1)  # noqa: E731
    d_b, d_a, d = (torch.randn(5, 3, 4, 4) for _ in range(3))
    a, b = Anchor(d_a, _grad(loss, d_a)), Anchor(d_b, _grad(loss, d_b))
    for order in (1, 2):
        assert torch.allclose(taylor_gradient(d, a, b, order), _grad(loss, d))


def test_taylor_gradient_error_on_a_quadratic_is_what_the_derivation_predicts():
    """L = ½ δᵀAδ + bᵀδ: order 1 misses A·v, the secant (order 2) misses only A·v⊥, v⊥ ⟂ s = δ_a − δ_b."""
    torch.manual_seed(0)
    n = 12
    m = torch.randn(n, n)
    A, bias = m @ m.T / n, torch.randn(n)
    loss = lambda d: 0.5 * ((d @ A) * d).sum(1) + d @ bias  # noqa: E731
    d_b, d_a = torch.randn(4, n), torch.randn(4, n)
    a, b = Anchor(d_a, _grad(loss, d_a)), Anchor(d_b, _grad(loss, d_b))
    s = d_a - d_b
    for v in (torch.randn(4, n), 0.3 * s):  # a general step, and one along the secant (where order 2 is exact)
        exact = _grad(loss, d_a + v)
        v_perp = v - s * ((s * v).sum(1, keepdim=True) / (s * s).sum(1, keepdim=True))
        assert torch.allclose(exact - taylor_gradient(d_a + v, a, b, order=1), v @ A, atol=1e-5)
        assert torch.allclose(exact - taylor_gradient(d_a + v, a, b, order=2), v_perp @ A, atol=1e-5)
    assert torch.allclose(taylor_gradient(d_a + 0.3 * s, a, b, order=2), _grad(loss, d_a + 0.3 * s), atol=1e-5)


def test_taylor_gradient_error_on_a_small_cnn_shrinks_with_the_step(capsys):
    """On a real network the approximation is only local: its relative error, reported per step size, falls as
    the distance from the anchors falls, and the secant term beats holding the gradient fixed."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 8, 3), nn.Softplus(), nn.Flatten(), nn.Linear(8 * 10 * 10, 10))
    x, y = torch.rand(16, 1, 12, 12), torch.randint(0, 10, (16,))
    loss = lambda d: F.cross_entropy(model(x + d), y, reduction="none")  # noqa: E731
    direction = torch.randn_like(x).sign()
    errors = {}
    for step in (0.1, 0.03, 0.01, 0.003):
        d_b, d_a, d = torch.zeros_like(x), step * direction, 2 * step * direction + step * torch.randn_like(x)
        a, b = Anchor(d_a, _grad(loss, d_a)), Anchor(d_b, _grad(loss, d_b))
        exact = _grad(loss, d)
        for order in (1, 2):
            errors[step, order] = ((taylor_gradient(d, a, b, order) - exact).norm() / exact.norm()).item()
        print(f"step {step}: relative error order 1 {errors[step, 1]:.3g}, order 2 {errors[step, 2]:.3g}")
    assert errors[0.003, 2] < errors[0.03, 2] < errors[0.1, 2]
    assert all(errors[s, 2] < errors[s, 1] for s in (0.01, 0.003))


def test_attack_with_approximated_steps_counts_only_exact_ones_and_stays_in_the_ball():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 3))
    x, y = torch.rand(32, 1, 4, 4), torch.randint(0, 3, (32,))
    counter = PassCounter()
    x_adv = pgd(model, x, y, eps=0.1, alpha=0.02, steps=10, exact_steps=[0, 3, 6], counter=counter)
    assert counter.total == 32 * 3
    assert (x_adv - x).abs().max() <= 0.1 + 1e-6 and x_adv.min() >= 0 and x_adv.max() <= 1
    assert F.cross_entropy(model(x_adv), y) > F.cross_entropy(model(x), y)
    with pytest.raises(ValueError, match="exact_steps must include step 0"):
        pgd(model, x, y, eps=0.1, alpha=0.02, steps=10, exact_steps=[1, 2])


def test_carried_perturbation_follows_its_example_through_crops_and_flips():
    """A perturbation stored in the original frame, moved through the batch's crop and flip, lands on the same image
    pixels as the image itself; mapping it back restores it (pixels outside the crop window keep their value)."""
    gen = torch.Generator().manual_seed(0)
    images = torch.rand(6, 3, 8, 8, generator=gen)
    delta = 0.1 * torch.sin(40 * images)  # a per-pixel function of the image: aligned iff it moves with the image
    crop, flip = sample_augmentation(6, 2, True, gen)
    x = apply_augmentation(images, crop, flip, 2)
    moved = apply_augmentation(delta, crop, flip, 2)
    inside = apply_augmentation(torch.ones_like(images), crop, flip, 2) > 0  # not the zero padding
    assert torch.allclose(moved[inside], 0.1 * torch.sin(40 * x)[inside])
    assert torch.equal(invert_augmentation(moved, crop, flip, 2, into=delta), delta)
    changed = invert_augmentation(moved + 1.0, crop, flip, 2, into=delta)
    covered = invert_augmentation(inside.float(), crop, flip, 2, into=torch.zeros_like(delta)) > 0
    assert torch.allclose(changed[covered], delta[covered] + 1.0) and torch.equal(changed[~covered], delta[~covered])


def test_gaat_cost_and_carry_on_synthetic_data(tmp_path):
    results = run(tmp_path, ["trainer.epochs=2", "method.steps=8", "method.n_exact=3"])
    assert results["passes_per_example"] == pytest.approx(3 + 1)
    state = torch.load(tmp_path / "checkpoints" / "last.pt", weights_only=True)["method"]
    assert state["seen"].all() and state["delta"].abs().max() <= 0.1 + 1e-3  # every example's delta, in the ball


def test_resume_mid_epoch_equals_an_uninterrupted_run(tmp_path, monkeypatch):
    args = ["trainer.epochs=3", "method.steps=6", "method.n_exact=2", "trainer.deterministic=true"]
    straight = run(tmp_path / "straight", args)
    step = GAAT.train_step

    def interrupted_step(self, batch, ctx):
        out = step(self, batch, ctx)
        if (ctx.epoch, ctx.batch_idx) == (1, 4):  # mid-epoch: half the examples carry this epoch's delta
            os.kill(os.getpid(), signal.SIGUSR1)
        return out

    monkeypatch.setattr(GAAT, "train_step", interrupted_step)
    with pytest.raises(Interrupted):
        run(tmp_path / "resumed", args)
    monkeypatch.undo()
    resumed = run(tmp_path / "resumed", args)
    a = torch.load(tmp_path / "straight" / "checkpoints" / "last.pt", weights_only=True)
    b = torch.load(tmp_path / "resumed" / "checkpoints" / "last.pt", weights_only=True)
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert torch.equal(a["method"]["delta"], b["method"]["delta"])
    assert [h["train/loss"] for h in straight["history"]] == [h["train/loss"] for h in resumed["history"]]


@pytest.mark.parametrize("override, message", [
    ("method.n_exact=0", "method.n_exact=0 must be in 1..method.steps"),
    ("method.order=3", "method.order=3 is not valid"),
    ("method.exact_at=middle", "method.exact_at='middle' is not valid"),
])
def test_bad_knobs_are_one_line_errors(tmp_path, override, message):
    with pytest.raises(ConfigError, match=message.replace(".", r"\.").replace("'", "'")):
        run(tmp_path, ["trainer.epochs=1", override])
