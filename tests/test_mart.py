"""MART: the attack and the loss equal the authors' mart.py (github YisenWang/MART) on one batch, the attack stays in
the eps-ball and the image box, K + 2 passes per example, and a resumed run equals an uninterrupted one."""
from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from advtrain.attacks import PassCounter
from advtrain.config import check_config
from advtrain.data import Batch
from advtrain.engine import run as run_module
from advtrain.methods import build_method
from advtrain.methods.mart import mart_terms
from advtrain.schema import TRAIN_SECTIONS
from conftest import SYNTH, TINY, checked, compose_train, make_context

pytestmark = pytest.mark.usefixtures("one_thread")

EPS, ALPHA, STEPS, BETA = 8 / 255, 2 / 255, 10, 6.0


# --- the authors' mart_loss (mart.py), restated step by step with their operations and constants --------------------

def authors_attack(model, x_natural, y, step_size, epsilon, perturb_steps):
    """Their inner maximisation: eval mode, x + 0.001 N(0, 1) unclamped, sign steps on mean CE, clamp to the ball and
    [0, 1] after each step, then train mode."""
    model.eval()
    x_adv = x_natural.detach() + 0.001 * torch.randn(x_natural.shape).detach()
    for _ in range(perturb_steps):
        x_adv.requires_grad_()
        with torch.enable_grad():
            loss_ce = F.cross_entropy(model(x_adv), y)
        grad = torch.autograd.grad(loss_ce, [x_adv])[0]
        x_adv = x_adv.detach() + step_size * torch.sign(grad.detach())
        x_adv = torch.min(torch.max(x_adv, x_natural - epsilon), x_natural + epsilon)
        x_adv = torch.clamp(x_adv, 0.0, 1.0)
    model.train()
    return torch.clamp(x_adv, 0.0, 1.0).detach()


def authors_loss(logits, logits_adv, y, beta):
    """Their loss lines on given clean and adversarial logits: argsort's new_y, nll_loss of log(1.0001 - p + 1e-12),
    nn.KLDivLoss(reduction='none') of log(adv_probs + 1e-12) against nat_probs summed over classes, weighted by
    (1.0000001 - true_probs), divided by the batch size."""
    kl = nn.KLDivLoss(reduction="none")
    batch_size = len(logits)
    adv_probs = F.softmax(logits_adv, dim=1)
    tmp1 = torch.argsort(adv_probs, dim=1)[:, -2:]
    new_y = torch.where(tmp1[:, -1] == y, tmp1[:, -2], tmp1[:, -1])
    loss_adv = F.cross_entropy(logits_adv, y) + F.nll_loss(torch.log(1.0001 - adv_probs + 1e-12), new_y)
    nat_probs = F.softmax(logits, dim=1)
    true_probs = torch.gather(nat_probs, 1, (y.unsqueeze(1)).long()).squeeze()
    loss_robust = (1.0 / batch_size) * torch.sum(
        torch.sum(kl(torch.log(adv_probs + 1e-12), nat_probs), dim=1) * (1.0000001 - true_probs))
    return loss_adv + float(beta) * loss_robust


def _model():
    torch.manual_seed(0)  # BN: their attack runs in eval mode, their update in train mode; both are checked
    return nn.Sequential(nn.Flatten(), nn.Linear(36, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 5))


def _batch(n=32, low=0.1, high=0.9):
    g = torch.Generator().manual_seed(1)
    x = low + (high - low) * torch.rand(n, 1, 6, 6, generator=g)
    return Batch(x, torch.randint(0, 5, (n,), generator=g), torch.arange(n), None, None)


def _mart(*overrides):
    cfg = checked([*TINY, "method=mart", f"method.eps={EPS}", f"method.alpha={ALPHA}", f"method.steps={STEPS}",
                   *overrides])
    return build_method(cfg.method, type("Info", (), {"num_classes": 5})())


def test_the_attack_equals_the_authors_on_interior_pixels():
    """With every pixel further than 0.001·|N(0,1)| from 0 and 1 the engine's projected start is their unclamped
    one, so the same seed gives the same x' bit for bit."""
    model, batch, method = _model(), _batch(), _mart()
    method.setup(make_context(model))
    torch.manual_seed(5)
    theirs = authors_attack(model, batch.x, batch.y, ALPHA, EPS, STEPS)
    model.train()
    torch.manual_seed(5)
    ours = method.adversarial(batch, model, PassCounter())
    assert model.training  # BN back in train mode for the update
    assert torch.equal(ours, theirs)


def test_the_loss_and_its_gradient_equal_the_authors_on_the_same_adversarial_batch():
    model, batch, method = _model(), _batch(), _mart()
    ctx = make_context(model)
    method.setup(ctx)
    torch.manual_seed(5)
    x_adv = method.adversarial(batch, model, PassCounter())
    model.train()

    def grads(loss):
        model.zero_grad()
        loss.backward()
        return [p.grad.clone() for p in model.parameters()]

    logits, logits_adv = method.forward_pair(model, batch.x, x_adv)  # separate forwards, as their code
    top = logits_adv.argmax(1)
    assert (top == batch.y).any() and (top != batch.y).any()  # both branches of their new_y
    theirs = authors_loss(logits, logits_adv, batch.y, BETA)
    bce, robust = mart_terms(logits, logits_adv, batch.y)
    ours = bce + method.cfg.beta * robust
    assert ours.item() == pytest.approx(theirs.item(), abs=1e-6)
    g_theirs = grads(authors_loss(*method.forward_pair(model, batch.x, x_adv), batch.y, BETA))
    bce, robust = mart_terms(*method.forward_pair(model, batch.x, x_adv), batch.y)
    g_ours = grads(bce + BETA * robust)
    for a, b in zip(g_ours, g_theirs):
        assert torch.allclose(a, b, atol=1e-6)


def test_the_attack_stays_in_the_eps_ball_and_the_image_box():
    model, method = _model(), _mart("method.alpha=0.1", "method.steps=5")  # steps far larger than eps
    batch = _batch(low=-0.2, high=1.2)
    batch = Batch(batch.x.clamp(0, 1), batch.y, batch.index, None, None)  # many pixels exactly at 0 and 1
    counter = PassCounter()
    x_adv = method.adversarial(batch, model, counter)
    assert (x_adv - batch.x).abs().max() <= EPS + 1e-6
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    assert (x_adv - batch.x).abs().max() > EPS / 2  # it moved


def test_a_run_counts_k_plus_two_passes_per_example(tmp_path):
    cfg = check_config(compose_train([*SYNTH, "method=mart", "method.steps=3", "dataset.n_train=128",
                                      "trainer.batch_size=64", "trainer.epochs=1"]), TRAIN_SECTIONS)
    results = run_module.train(cfg, tmp_path)
    assert results["passes_per_example"] == pytest.approx(3 + 2)  # K attack steps, the update's two halves
