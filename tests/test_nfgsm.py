"""N-FGSM: one minibatch equals the authors' train.py loop written out literally; the perturbation is noise of k eps
plus one sign step, in the image box and not projected to the eps-ball; 2 passes per example; resume equality."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from advtrain.data import Batch
from advtrain.engine import run as run_module
from advtrain.methods import build_method
from conftest import SYNTH, TINY, checked, make_context

pytestmark = pytest.mark.usefixtures("one_thread")

EPS = 0.1


class Recording(nn.Module):
    """The model, keeping the inputs of its forwards: the last one is what the update trained on."""

    def __init__(self, inner):
        super().__init__()
        self.inner, self.inputs = inner, []

    def forward(self, x):
        self.inputs.append(x.detach().clone())
        return self.inner(x)


def _model(channels: int = 1) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(channels, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                         nn.Linear(4 * 10 * 10, 4))


def _batch(channels: int = 1) -> Batch:
    g = torch.Generator().manual_seed(1)
    x = torch.rand(32, channels, 12, 12, generator=g)
    x[:, :, :3] = 0.0  # pixels on the box's edges, as MNIST's: the box clamp has work to do
    x[:, :, -3:] = 1.0
    return Batch(x, torch.randint(0, 4, (32,), generator=g), torch.arange(32), None, None)


def _method_step(model, batch, *overrides: str, seed: int = 7):
    """One train_step of method=nfgsm at eps = EPS; returns (its metrics, the input its update trained on)."""
    cfg = checked([*TINY, "method=nfgsm", f"method.eps={EPS}", *overrides])
    method = build_method(cfg.method, type("Info", (), {"num_classes": 4})())
    recording = Recording(model)
    ctx = make_context(recording, lr=0.1)
    method.setup(ctx)
    torch.manual_seed(seed)
    out = method.train_step(batch, ctx)
    return out, recording.inputs[-1], ctx


def _authors_step(model, X, y, epsilon, alpha, unif=2.0, clip=-1.0, seed: int = 7):
    """pdejorge/N-FGSM train.py's minibatch, line for line, in [0,1] pixel units (lower_limit 0, upper_limit 1, std 1,
    so its per-channel epsilon is one number); returns (loss, X + delta)."""
    lower_limit, upper_limit = torch.zeros(1), torch.ones(1)
    clamp = lambda X, lower_limit, upper_limit: torch.max(torch.min(X, upper_limit), lower_limit)  # noqa: E731
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model.train()
    torch.manual_seed(seed)
    if clip > 0:
        clip = torch.tensor(clip * epsilon)  # a tensor, as their per-channel epsilon makes it

    # Initialize random step
    eta = torch.zeros_like(X)
    if unif > 0:
        for j in range(X.shape[1]):
            eta[:, j, :, :].uniform_(-unif * epsilon, unif * epsilon)
        eta = clamp(eta, lower_limit - X, upper_limit - X)
    eta.requires_grad = True

    output = model(X + eta)
    loss = F.cross_entropy(output, y)
    grad = torch.autograd.grad(loss, eta)[0]
    grad = grad.detach()
    # Compute perturbation based on sign of gradient
    delta = eta + alpha * torch.sign(grad)

    delta = clamp(delta, lower_limit - X, upper_limit - X)
    if clip > 0:
        delta = clamp(delta, -clip, clip)

    delta = delta.detach()

    output = model(X + delta)

    # Training step
    loss = F.cross_entropy(output, y)
    opt.zero_grad()
    loss.backward()
    opt.step()
    return loss.detach(), X + delta


@pytest.mark.parametrize("overrides, authors", [([], {}), (["method.clip=1.0"], {"clip": 1.0}),
                                                (["method.k=1.0", "method.alpha=0.125"], {"unif": 1.0, "alpha": 0.125})])
def test_one_minibatch_equals_the_authors_code(overrides, authors):
    batch = _batch()
    theirs_model, ours_model = _model(), _model()
    loss, x_adv = _authors_step(theirs_model, batch.x, batch.y, EPS, **{"alpha": EPS, **authors})
    out, trained_on, _ = _method_step(ours_model, batch, *overrides)
    assert torch.allclose(trained_on, x_adv, atol=1e-6)  # the same noise, the same step, the same clamps
    assert out["loss"].item() == pytest.approx(loss.item(), rel=1e-5)
    for a, b in zip(theirs_model.state_dict().values(), ours_model.state_dict().values()):
        assert torch.allclose(a.float(), b.float(), atol=1e-6)  # weights and BN statistics (attacked in train mode)


def test_the_perturbation_is_noise_plus_one_sign_step_not_projected_to_the_ball():
    batch = _batch(channels=3)
    model = _model(channels=3)
    attacked = copy.deepcopy(model)
    _, x_adv, ctx = _method_step(model, batch)
    delta = x_adv - batch.x
    assert ((x_adv >= 0) & (x_adv <= 1)).all()
    assert delta.abs().max() <= 3 * EPS + 1e-6         # k eps of noise + alpha = eps of step
    assert (delta.abs() > 1.5 * EPS).float().mean() > 0.2  # far outside the eps-ball: nothing projected it there

    # The step from the noisy point is alpha sign(grad) there, wherever the box did not clamp it.
    torch.manual_seed(7)
    eta = (torch.empty_like(batch.x).uniform_(-2 * EPS, 2 * EPS) + batch.x).clamp(0, 1) - batch.x
    assert (eta.abs() <= 2 * EPS + 1e-6).all()
    noisy = (batch.x + eta).requires_grad_(True)
    attacked.train()
    (grad,) = torch.autograd.grad(F.cross_entropy(attacked(noisy), batch.y), noisy)
    free = ((batch.x + eta + EPS * grad.sign()) > 0) & ((batch.x + eta + EPS * grad.sign()) < 1)
    assert free.float().mean() > 0.5
    assert torch.allclose((delta - eta)[free], (EPS * grad.sign())[free], atol=1e-6)
    assert ctx.counter.total == 2 * len(batch.y)  # the attack step and the update


def test_clip_bounds_the_perturbation_by_a_multiple_of_eps():
    batch = _batch()
    _, x_adv, _ = _method_step(_model(), batch, "method.clip=1.0")
    assert (x_adv - batch.x).abs().max() <= EPS + 1e-6


def test_a_run_costs_two_passes_per_example(tmp_path):
    cfg = checked([*SYNTH, "method=nfgsm", "dataset.n_train=128", "trainer.batch_size=64", "trainer.epochs=1"])
    results = run_module.train(cfg, tmp_path)
    assert results["method"] == "nfgsm" and results["passes_per_example"] == pytest.approx(2.0)
