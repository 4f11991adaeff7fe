"""OAT: per-example routing by lambda (never by position), BN_adv untouched by lambda = 0 examples, every attack at
any sub-batch size, the encoding inside the checkpoint bit for bit, resume equality, 2-rank DDP with a batch that has
no lambda = 0 example, load_model per view."""
from __future__ import annotations

import json

import pytest
import torch

import advtrain
from advtrain.data.loader import TensorEvalSet
from advtrain.engine.checkpoint import Checkpoint
from advtrain.engine.evaluate import evaluate_views
from advtrain.engine.network import model_from_checkpoint
from advtrain.methods import build_method
from advtrain.models import bind, build_model
from advtrain.models.conditioned_bn import FiLMDualBN, FixedLambda, Lambdas, orthogonal_encoding
from conftest import TINY, checked, run_cli

pytestmark = pytest.mark.usefixtures("one_thread")
LAMBDAS = (0.0, 0.1, 0.2, 0.3, 0.4, 1.0)
OAT = [*TINY, "arch=bn_cnn", "method=oat"]


def _oat_model(seed: int = 0):
    torch.manual_seed(seed)
    cfg = checked(OAT)
    method = build_method(cfg.method, type("Info", (), {"num_classes": 4})())
    model = build_model("bn_cnn", num_classes=4, in_shape=(1, 12, 12), mean=[0.0], std=[1.0])
    return method, method.wrap_model(model, {})


def test_routing_is_per_example_not_by_position():
    _, model = _oat_model()
    model.train()
    x = torch.rand(12, 1, 12, 12)
    values = torch.tensor([0.0, 0.3, 1.0, 0.0, 0.1, 0.2, 0.4, 0.0, 1.0, 0.3, 0.1, 0.0])
    perm = torch.randperm(12, generator=torch.Generator().manual_seed(1))
    out = model(x, cond=Lambdas.of(values, LAMBDAS, "cpu"))
    shuffled = model(x[perm], cond=Lambdas.of(values[perm], LAMBDAS, "cpu"))
    assert torch.allclose(shuffled, out[perm], atol=1e-5)  # shuffling a batch permutes its outputs, nothing else


def test_lambda_zero_examples_never_touch_bn_adv():
    _, model = _oat_model()
    model.train()
    blocks = [m for m in model.modules() if isinstance(m, FiLMDualBN)]
    assert len(blocks) == 2
    before = [(b.bn_adv.running_mean.clone(), b.bn_clean.running_mean.clone()) for b in blocks]
    model(torch.rand(8, 1, 12, 12), cond=Lambdas.of([0.0] * 8, LAMBDAS, "cpu"))
    for block, (adv, clean) in zip(blocks, before):
        assert torch.equal(block.bn_adv.running_mean, adv) and not torch.equal(block.bn_clean.running_mean, clean)
    with pytest.raises(ValueError, match="lambda must be one of"):
        Lambdas.of([0.25], LAMBDAS, "cpu")


def test_every_attack_runs_on_any_sub_batch_size():
    _, model = _oat_model()
    model.eval()
    evalset = TensorEvalSet(torch.randint(0, 256, (7, 1, 12, 12), dtype=torch.uint8), torch.randint(0, 4, (7,)))
    suite = {"pgd": {"type": "pgd", "eps": 0.1, "alpha": 0.03, "steps": 3, "restarts": 3},
             "cw": {"type": "cw", "eps": 0.1, "alpha": 0.03, "steps": 3},
             "aa": {"type": "autoattack", "eps": 0.1, "version": "custom", "attacks": ["apgd-ce", "apgd-t"]}}
    views = build_method(checked(OAT).method, type("Info", (), {"num_classes": 4})()).eval_views()
    scores = evaluate_views(model, evalset, suite, n=None, batch_size=3, views=views)  # batches of 3, 3 and 1
    assert list(scores) == [f"lambda={v:g}" for v in LAMBDAS]
    assert all(s["n"] == 7 and 0 <= s["aa"] <= s["clean"] <= 1 for s in scores.values())


def test_a_model_without_batchnorm_is_refused_in_one_line():
    from advtrain.errors import ConfigError

    with pytest.raises(ConfigError, match="arch=mnist_net has none"):  # by the config check, before any data
        checked([*TINY, "method=oat"])  # mnist_net: no BatchNorm
    method = build_method(checked(OAT).method, type("Info", (), {"num_classes": 4})())
    model = build_model("mnist_net", num_classes=4, in_shape=(1, 12, 12), mean=[0.0], std=[1.0])
    with pytest.raises(ConfigError, match="arch=mnist_net has none"):
        method.wrap_model(model, {})


@pytest.fixture(scope="module")
def oat_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("oat")
    proc = run_cli([*OAT, "trainer.epochs=2", f"hydra.run.dir={run_dir}"], cwd=run_dir)
    assert proc.returncode == 0, proc.stderr
    return run_dir


@pytest.mark.slow
def test_the_encoding_travels_in_the_checkpoint_and_views_load(oat_run):
    results = json.loads((oat_run / "results.json").read_text())
    assert list(results["views"]) == [f"lambda={v:g}" for v in LAMBDAS]
    assert results["passes_per_example"] == pytest.approx(1 + (64 - 11) / 64 * (7 + 1))  # batch 64: 11 at 0
    with pytest.raises(advtrain.errors.CheckpointError, match=r"load_model\(path, view=...\), one of 'lambda=0', "):
        advtrain.load_model(oat_run / "checkpoints" / "last.pt")  # the network needs its lambda: said at load
    _, plain = model_from_checkpoint(Checkpoint.load(oat_run / "checkpoints" / "last.pt"))
    plain.eval()
    saved = torch.load(oat_run / "checkpoints" / "last.pt", weights_only=True)["model"]
    blocks = {name: m for name, m in plain.named_modules() if isinstance(m, FiLMDualBN)}
    assert blocks
    for name, block in blocks.items():
        assert torch.equal(block.encoding, saved[f"{name}.encoding"])  # bit for bit, from the checkpoint
        assert torch.allclose(block.encoding, orthogonal_encoding(len(LAMBDAS), 128, seed=0), atol=1e-6)
    view = advtrain.load_model(oat_run / "checkpoints" / "last.pt", view="lambda=0.3")
    x = torch.rand(5, 1, 12, 12)
    with torch.no_grad():
        assert torch.equal(view(x), bind(plain, FixedLambda(0.3, LAMBDAS))(x))
        assert not torch.equal(view(x), bind(plain, FixedLambda(0.0, LAMBDAS))(x))


@pytest.mark.slow
def test_oat_on_two_gloo_ranks_with_no_lambda_zero_example(tmp_path):
    run_dir = tmp_path / "ddp"
    proc = run_cli([*OAT, "method.p_zero=0", "trainer.devices=2", "trainer.accelerator=cpu",
                    f"hydra.run.dir={run_dir}"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr  # BN_clean has no gradient in any step: DDP was told
    results = json.loads((run_dir / "results.json").read_text())
    assert results["world_size"] == 2 and len(results["views"]) == len(LAMBDAS)


def _pgd_step(overrides: list[str], model, batch):
    from conftest import make_context

    method = build_method(checked([*TINY, *overrides]).method, type("Info", (), {"num_classes": 4})())
    ctx = make_context(model)
    method.setup(ctx)
    torch.manual_seed(3)
    method.train_step(batch, ctx)
    return ctx.counter.total / len(batch.y)


def test_the_fixed_lambda_baseline_is_pgd_at_with_a_weighted_clean_term():
    """method=pgd method.adv_weight=lambda: the dedicated model OAT's paper holds each of its lambdas against."""
    import copy

    from torch import nn
    from torch.nn import functional as F

    from advtrain.data.loader import Batch
    from advtrain.errors import ConfigError
    from conftest import make_context

    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(144, 4))
    batch = Batch(torch.rand(16, 1, 12, 12), torch.randint(0, 4, (16,)), torch.arange(16), None, None)
    natural, zero = copy.deepcopy(model), copy.deepcopy(model)
    assert _pgd_step(["method=natural"], natural, batch) == _pgd_step(
        ["method=pgd", "method.adv_weight=0"], zero, batch) == 1.0  # lambda = 0: no attack at all
    assert all(torch.equal(a, b) for a, b in zip(natural.parameters(), zero.parameters()))

    half, expected = copy.deepcopy(model), copy.deepcopy(model)
    steps = checked([*TINY, "method=pgd"]).method.steps
    assert _pgd_step(["method=pgd", "method.adv_weight=0.3"], half, batch) == steps + 2
    method = build_method(checked([*TINY, "method=pgd"]).method, type("Info", (), {"num_classes": 4})())
    ctx = make_context(expected)
    torch.manual_seed(3)
    x_adv = method.attack(ctx.attack_model, ctx.counter, batch.x, batch.y, start="uniform")
    loss = 0.7 * F.cross_entropy(expected(batch.x), batch.y) + 0.3 * F.cross_entropy(expected(x_adv), batch.y)
    ctx.update(loss)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(half.parameters(), expected.parameters()))

    with pytest.raises(ConfigError, match=r"method.adv_weight=1.5: expected a weight in \[0, 1\]"):
        build_method(checked([*TINY, "method=pgd", "method.adv_weight=1.5"]).method, None)


def test_eval_lambdas_keep_the_evaluation_to_some_views_while_load_model_offers_all():
    cfg = checked([*OAT, "method.eval_lambdas=[1.0,0.0]"])
    method = build_method(cfg.method, type("Info", (), {"num_classes": 4})())
    assert [v.name for v in method.eval_views()] == ["lambda=0", "lambda=1"]
    assert [v.name for v in method.views()] == [f"lambda={v:g}" for v in LAMBDAS]
    with pytest.raises(advtrain.errors.ConfigError, match=r"method.eval_lambdas=\[0.5\]: expected a non-empty list "
                                                          r"of values of method.lambdas=\[0.0, 0.1, "):
        build_method(checked([*OAT, "method.eval_lambdas=[0.5]"]).method, type("Info", (), {"num_classes": 4})())
