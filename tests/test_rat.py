"""RAT and AWP: the closed-form last-layer gradient, the soft-label targets, AWP's per-layer perturbation and its
exact restore, RAT without its Taylor terms equal to TRADES, resume equality and 2-rank DDP."""
from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from advtrain.data import Batch
from advtrain.methods import build_method
from advtrain.methods.awp import WeightPerturbation
from advtrain.methods.rat import last_layer_row_sums, smoothing_mass, smoothing_targets
from conftest import TINY, checked, make_context, run_cli

pytestmark = pytest.mark.usefixtures("one_thread")


def test_the_closed_form_last_layer_gradient_equals_autograds():
    torch.manual_seed(0)
    features, y = torch.randn(16, 7), torch.randint(0, 5, (16,))
    head = nn.Linear(7, 5)
    logits = head(features)
    (grad,) = torch.autograd.grad(F.cross_entropy(logits, y), head.weight)
    assert torch.allclose(last_layer_row_sums(logits, features, y), grad.sum(dim=1), atol=1e-6)


def test_soft_labels_from_a_gap_vector():
    targets = smoothing_targets(torch.tensor([0.0, 1.0, 3.0]), c=0.5)
    # shifted by its min and normalised: (0, 1/4, 3/4); row i spreads c over the others in proportion
    expected = torch.tensor([[0.5, 0.5 * 0.25, 0.5 * 0.75],
                             [0.5 * 0.0, 0.5, 0.5 * 1.0],
                             [0.5 * 0.0, 0.5 * 1.0, 0.5]])
    assert torch.allclose(targets, expected)
    equal = smoothing_targets(torch.full((4,), 2.0), c=0.8)  # the code's 0/0: uniform over the other classes
    assert torch.isfinite(equal).all() and torch.allclose(equal.sum(dim=1), torch.ones(4))
    assert torch.allclose(equal[0], torch.tensor([0.2, 0.8 / 3, 0.8 / 3, 0.8 / 3]))
    assert (smoothing_mass(10), smoothing_mass(100)) == pytest.approx((0.8, 0.98))  # the code's two values


def test_awp_perturbs_each_layer_by_gamma_times_its_norm_and_restores_exactly():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4 * 4 * 4, 3))
    x, y = torch.rand(8, 1, 6, 6), torch.randint(0, 3, (8,))
    before = copy.deepcopy(model.state_dict())
    awp = WeightPerturbation(model, gamma=0.01)
    diffs = awp.compute(lambda m: F.cross_entropy(m(x), y))
    assert [p.dim() for p in awp.params] == [4, 2]  # weights with more than one dimension: no biases, no BN
    for p, d in zip(awp.params, diffs):
        assert d.norm() == pytest.approx(0.01 * p.norm().item(), rel=1e-5)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # BN statistics kept too
    with awp.applied(diffs):
        assert not torch.equal(model[0].weight, before["0.weight"])
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # bit for bit


@pytest.mark.parametrize("overrides", [["method=awp", "method.base=pgd"], ["method=awp", "method.base=trades"],
                                       ["method=rat", "method.base=awp_trades"]])
def test_the_weight_perturbation_raises_the_base_loss(overrides):
    """Adversarial in weight space: at w + v the training loss is higher than at w (measured here as the clean
    cross-entropy, which the base losses' gradients point up as well on a fresh model)."""
    torch.manual_seed(0)
    model = _Features(nn.Sequential(nn.Flatten(), nn.Linear(144, 32), nn.ReLU(), nn.Linear(32, 4)))
    batch = Batch(torch.rand(32, 1, 12, 12), torch.randint(0, 4, (32,)), torch.arange(32), None, None)
    seen = []

    def recording(compute):
        def wrapped(loss_of, scale=1.0):
            diffs = compute(loss_of, scale)
            with torch.no_grad():
                plain = F.cross_entropy(model(batch.x), batch.y).item()
                with method.perturbation.applied(diffs):
                    seen.append((plain, F.cross_entropy(model(batch.x), batch.y).item()))
            return diffs
        return wrapped

    cfg = checked([*TINY, *overrides, "method.warmup_epochs=0", "method.gamma=0.05"])
    method = build_method(cfg.method, type("Info", (), {"num_classes": 4})())
    ctx = make_context(model)
    method.setup(ctx)
    method.perturbation.compute = recording(method.perturbation.compute)
    method.train_step(batch, ctx)
    (plain, perturbed), = seen
    assert perturbed > plain


@pytest.mark.parametrize("overrides", [["method=awp", "method.base=pgd"], ["method=rat", "method.base=awp_trades"]])
def test_the_eps_warm_up_ramps_the_weight_perturbation(overrides):
    """gamma is a threat radius in weight space: at ε warm-up factor f each layer's v is f * gamma * ||w_l|| (at f = 0
    no perturbation, at f = 1 the configured size). Full-size from the first update, AT-AWP on MNIST stayed at chance."""
    torch.manual_seed(0)
    model = _Features(nn.Sequential(nn.Flatten(), nn.Linear(144, 32), nn.ReLU(), nn.Linear(32, 4)))
    batch = Batch(torch.rand(32, 1, 12, 12), torch.randint(0, 4, (32,)), torch.arange(32), None, None)
    cfg = checked([*TINY, *overrides, "method.warmup_epochs=0", "method.gamma=0.05"])
    method = build_method(cfg.method, type("Info", (), {"num_classes": 4})())
    ctx = make_context(model)
    method.setup(ctx)
    compute, sizes = method.perturbation.compute, []

    def recording(loss_of, scale=1.0):
        diffs = compute(loss_of, scale)
        sizes.append([(d.norm() / p.norm()).item() for d, p in zip(diffs, method.perturbation.params)])
        return diffs

    method.perturbation.compute = recording
    for factor in (0.0, 0.4, 1.0):
        method.threat.scale = factor
        method.train_step(batch, ctx)
        assert sizes[-1] == pytest.approx([0.05 * factor] * 2, rel=1e-4, abs=1e-9), factor


def _one_step(method_overrides: list[str], model, batch):
    cfg = checked([*TINY, *method_overrides])
    method = build_method(cfg.method, type("Info", (), {"num_classes": 4})())
    ctx = make_context(model)
    method.setup(ctx)
    torch.manual_seed(3)
    method.train_step(batch, ctx)
    return model


class _Features(nn.Module):  # the update's forward takes features=True, as a Classifier does
    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x, features=False):
        logits = self.inner(x)
        return (logits, x.flatten(1)) if features else logits


def test_rat_without_its_taylor_terms_is_trades():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(144, 4))
    batch = Batch(torch.rand(16, 1, 12, 12), torch.randint(0, 4, (16,)), torch.arange(16), None, None)
    trades = _one_step(["method=trades"], copy.deepcopy(model), batch)
    rat = _one_step(["method=rat", "method.taylor_weight=0"], _Features(copy.deepcopy(model)), batch)
    for a, b in zip(trades.parameters(), rat.parameters()):
        assert torch.allclose(a, b, atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("method, passes", [(["method=awp"], 7 + 2), (["method=rat"], 7 + 1 / 3 + 2),
                                            (["method=rat", "method.base=awp_trades", "method.warmup_epochs=0"],
                                             7 + 1 / 3 + 4)])
def test_awp_and_rat_train_on_two_gloo_ranks_and_count_their_passes(method, passes, tmp_path):
    run_dir = tmp_path / "ddp"
    proc = run_cli([*TINY, *method, "trainer.devices=2", "trainer.accelerator=cpu", f"hydra.run.dir={run_dir}"],
                   cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    results = json.loads((run_dir / "results.json").read_text())
    assert results["world_size"] == 2 and results["passes_per_example"] == pytest.approx(passes)


def test_trades_starts_its_attack_at_method_init_std():
    """method.init_std reaches the attack: with one negligible step, x' - x is the start's N(0, init_std^2) draw."""
    from types import SimpleNamespace

    from advtrain.attacks.passes import PassCounter
    from advtrain.models import build_model

    torch.manual_seed(0)
    model = build_model("mnist_net", num_classes=4, in_shape=(1, 12, 12), mean=[0.0], std=[1.0]).eval()
    batch = SimpleNamespace(x=0.25 + 0.5 * torch.rand(8, 1, 12, 12), y=torch.randint(0, 4, (8,)))  # away from 0, 1

    def spread(init_std: float) -> float:
        cfg = checked([*TINY, "method=trades", "method.steps=1", "method.alpha=1e-6", f"method.init_std={init_std}"])
        method = build_method(cfg.method, SimpleNamespace(num_classes=4))
        return float((method.adversarial(batch, model, PassCounter()) - batch.x).std())

    assert spread(0.001) == pytest.approx(0.001, rel=0.1)
    assert spread(0.02) == pytest.approx(0.02, rel=0.1)
