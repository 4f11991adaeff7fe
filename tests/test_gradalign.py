"""GradAlign: the regulariser equals the authors' lines (tml-epfl/understanding-fast-adv-training, train.py and
utils.py) on one batch, its gradient reaches the weights through the input gradient (double backprop), the
documented pass count, the refusals, and a resumed run equal to an uninterrupted one."""
from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from advtrain.data import Batch
from advtrain.engine.run import train
from advtrain.methods.base import config_of
from advtrain.methods.gradalign import GradAlign, alignment
from advtrain.schema import TRAIN_SECTIONS
from advtrain.config import ConfigError, check_config
from conftest import SYNTH, compose_train, make_context

pytestmark = pytest.mark.usefixtures("one_thread")

EPS, LAM = 0.1, 0.2


def tiny_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3))


def batch():
    gen = torch.Generator().manual_seed(1)
    return Batch(torch.rand(16, 1, 8, 8, generator=gen), torch.randint(0, 3, (16,), generator=gen), torch.arange(16),
                 None, None)


def authors_reg(model, X, y, eps, lam):
    """train.py's FGSM branch (attack_init=zero) and its grad_align_cos_lambda block, with utils.get_input_grad and
    utils.l2_norm_batch inlined, on the CPU (their .cuda() dropped)."""
    def clamp(X, l, u):
        return torch.max(torch.min(X, torch.tensor([u])), torch.tensor([l]))

    delta = torch.zeros_like(X, requires_grad=True)
    X_adv = clamp(X + delta, 0, 1)
    output = model(X_adv)
    loss = F.cross_entropy(output, y)
    grad = torch.autograd.grad(loss, delta, create_graph=True)[0]
    grad = grad.detach()
    # get_input_grad(model, X, y, opt, eps, half_prec, delta_init='random_uniform', backprop=True)
    delta2 = torch.zeros(X.shape)
    delta2.uniform_(-eps, eps)
    delta2.requires_grad = True
    grad2 = torch.autograd.grad(F.cross_entropy(model(X + delta2), y), delta2, create_graph=True)[0]
    grads_nnz_idx = ((grad**2).sum([1, 2, 3])**0.5 != 0) * ((grad2**2).sum([1, 2, 3])**0.5 != 0)
    grad1, grad2 = grad[grads_nnz_idx], grad2[grads_nnz_idx]
    grad1_norms, grad2_norms = (grad1 ** 2).sum([1, 2, 3]) ** 0.5, (grad2 ** 2).sum([1, 2, 3]) ** 0.5
    grad1_normalized = grad1 / grad1_norms[:, None, None, None]
    grad2_normalized = grad2 / grad2_norms[:, None, None, None]
    cos = torch.sum(grad1_normalized * grad2_normalized, (1, 2, 3))
    return lam * (1.0 - cos.mean())


def step(model, lam, lr=0.1, seed=5):
    method = GradAlign(config_of(GradAlign, eps=EPS, grad_align_lambda=lam), info=None)
    ctx = make_context(model, lr=lr)
    model.train()
    torch.manual_seed(seed)
    return method.train_step(batch(), ctx), ctx


def test_the_regulariser_equals_the_authors_lines():
    model = tiny_model()
    authors_model = copy.deepcopy(model).train()
    metrics, ctx = step(model, LAM)
    b = batch()
    torch.manual_seed(5)  # the same uniform draw for eta: start=none draws nothing before it
    expected = authors_reg(authors_model, b.x, b.y, EPS, LAM)
    assert metrics["grad_align"].item() == pytest.approx(expected.item(), abs=1e-6)
    assert 0 < metrics["grad_align"].item() < 2 * LAM
    assert ctx.counter.total == 16 * 5  # FGSM 1 + g2 1 + update 1 + the backward through g2's graph 2


def test_the_regulariser_gradient_reaches_the_weights_as_the_authors():
    """With SGD (no momentum), weights(lambda) - weights(0) = -lr * d reg / d w: the double backprop through g2
    (g1 detached), equal to the gradient of the authors' term."""
    lr = 0.1
    base, with_reg, authors_model = tiny_model(), tiny_model(), tiny_model().train()
    step(base, 0.0, lr)
    metrics, ctx = step(with_reg, LAM, lr)
    assert ctx.counter.total == 16 * 5
    b = batch()
    torch.manual_seed(5)
    reg = authors_reg(authors_model, b.x, b.y, EPS, LAM)
    grads = torch.autograd.grad(reg, list(authors_model.parameters()), allow_unused=True)
    changed = False
    for p0, p1, g in zip(base.parameters(), with_reg.parameters(), grads):
        expected = torch.zeros_like(p0) if g is None else -lr * g
        assert torch.allclose(p1.detach() - p0.detach(), expected, atol=1e-6)
        changed |= not torch.equal(p0, p1)
    assert changed  # the regulariser moved the weights


def test_lambda_zero_is_plain_fgsm():
    metrics, ctx = step(tiny_model(), 0.0)
    assert ctx.counter.total == 16 * 2 and metrics["grad_align"].item() == 0.0 and "grad_cos" not in metrics


def test_examples_with_a_zero_gradient_are_left_out_without_nan():
    g1, g2 = torch.randn(4, 1, 3, 3), torch.randn(4, 1, 3, 3, requires_grad=True)
    g1[1] = 0
    term, _ = alignment(g1, g2)
    keep = [0, 2, 3]
    cos = F.cosine_similarity(g1[keep].flatten(1), g2[keep].flatten(1), dim=1)
    assert term.item() == pytest.approx(1 - cos.mean().item(), abs=1e-6)
    (grad,) = torch.autograd.grad(term, g2)
    assert torch.isfinite(grad).all() and torch.equal(grad[1], torch.zeros_like(grad[1]))
    none_left, _ = alignment(torch.zeros(2, 3), torch.randn(2, 3))
    assert none_left.item() == 0.0


def test_passes_per_example_on_synthetic_data(tmp_path):
    cfg = check_config(compose_train([*SYNTH, "dataset.n_train=128", "trainer.batch_size=64", "trainer.epochs=1",
                                      "method=gradalign"]), TRAIN_SECTIONS)
    results = train(cfg, tmp_path)
    assert results["passes_per_example"] == pytest.approx(1 + 1 + 1 + 2)


def test_compile_is_refused_in_one_line(tmp_path):
    cfg = check_config(compose_train([*SYNTH, "dataset.n_train=64", "trainer.epochs=1", "method=gradalign",
                                      "trainer.compile=true"]), TRAIN_SECTIONS)
    with pytest.raises(ConfigError, match="cannot run under torch.compile"):
        train(cfg, tmp_path)


def test_ddp_is_refused_in_one_line():
    method = GradAlign(config_of(GradAlign, eps=EPS), info=None)
    with pytest.raises(ConfigError, match="trainer.devices=1"):
        method.setup(SimpleNamespace(dist=SimpleNamespace(enabled=True)))
