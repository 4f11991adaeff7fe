"""The catastrophic-overfitting guard, one mechanism for every single-step method: it stops and restores, or warns
and trains on, and it is off unless a method's paper used it (FGSM-RS)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from advtrain.config import check_config
from advtrain.methods import build_method
from advtrain.schema import TRAIN_SECTIONS
from conftest import compose_train, make_context

SINGLE_STEP = ["fgsm_rs", "nfgsm", "gradalign", "free"]


def _robust_model_and_batch():
    """Images all 0.2 or all 0.8, and a model thresholding their mean: robust at the synthetic eps."""
    y = torch.arange(64) % 2
    x = (0.2 + 0.6 * y.float()).view(-1, 1, 1, 1).expand(-1, 1, 4, 4).contiguous()
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 2))
    with torch.no_grad():
        model[1].weight.copy_(torch.tensor([[-1.0] * 16, [1.0] * 16]))
        model[1].bias.copy_(torch.tensor([8.0, -8.0]))
    return model, x, y


def _collapse(model):
    with torch.no_grad():  # the model now answers class 0 whatever it sees
        model[1].weight.zero_()
        model[1].bias.copy_(torch.tensor([1.0, 0.0]))


def _method(name: str, *overrides: str):
    cfg = check_config(compose_train([f"method={name}", "dataset=synthetic", *overrides]), TRAIN_SECTIONS)
    return build_method(cfg.method, None)


@pytest.mark.parametrize("name", SINGLE_STEP)
def test_stop_restores_the_last_good_weights_and_ends_training(name):
    model, x, y = _robust_model_and_batch()
    method = _method(name, "method.guard=true")
    ctx = make_context(model, batch=(x, y), autocast=lambda: torch.autocast("cpu", enabled=False))
    assert method.epoch_end(ctx, {})["guard_pgd_acc"] == 1.0 and ctx.stop_reason is None
    good = {k: v.clone() for k, v in model.state_dict().items()}
    _collapse(model)
    assert method.epoch_end(ctx, {})["guard_pgd_acc"] == 0.5
    assert ctx.stop_reason.startswith("catastrophic overfitting: guard PGD accuracy fell from 100.00% to 50.00%")
    assert all(torch.equal(v, good[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("name", SINGLE_STEP)
def test_warn_says_so_in_one_line_and_trains_on(name, capsys):
    model, x, y = _robust_model_and_batch()
    method = _method(name, "method.guard=true", "method.guard_action=warn")
    ctx = make_context(model, batch=(x, y), autocast=lambda: torch.autocast("cpu", enabled=False))
    method.epoch_end(ctx, {})
    _collapse(model)
    collapsed = {k: v.clone() for k, v in model.state_dict().items()}
    assert method.epoch_end(ctx, {})["guard_pgd_acc"] == 0.5 and ctx.stop_reason is None
    assert all(torch.equal(v, collapsed[k]) for k, v in model.state_dict().items())  # nothing restored
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines == ["warning: catastrophic overfitting in epoch 1: guard PGD accuracy fell from 100.00% to 50.00% "
                     "(method.guard_action=warn: training goes on)"]


@pytest.mark.parametrize("name,default", [("fgsm_rs", True), ("nfgsm", False), ("gradalign", False),
                                          ("free", False)])
def test_the_guard_is_on_by_default_only_where_the_paper_s_code_has_it(name, default):
    assert _method(name).cfg.guard is default
    model, x, y = _robust_model_and_batch()
    ctx = make_context(model, batch=(x, y))
    assert ("guard_pgd_acc" in _method(name).epoch_end(ctx, {})) is default
