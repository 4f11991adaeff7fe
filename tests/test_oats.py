"""OATS: the slimmed model at width 1 is OAT's, at a narrower width only its first channels count; FLOPs by a hand
count; one optimizer step per batch with every width's BN keeping its own statistics; the pass rule; an end-to-end
run whose results.json (and advtrain-eval's) has every (width, lambda) view with its FLOPs and whose views load;
resume equality."""
from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import advtrain
from advtrain.data import build_data
from advtrain.errors import ConfigError
from advtrain.methods import build_method
from advtrain.models import bind, build_model, forward_flops
from advtrain.models.conditioned_bn import FixedLambda, Lambdas
from advtrain.models.slimmable import FixedSlim, Slim, SlimConv2d, SlimFiLMDualBN, SlimLinear
from conftest import TINY, checked, make_context, run_cli

pytestmark = pytest.mark.usefixtures("one_thread")
LAMBDAS = (0.0, 0.1, 0.2, 0.3, 0.4, 1.0)
WIDTHS = (0.5, 0.75, 1.0)
SHAPE = (1, 12, 12)
OATS = [*TINY, "arch=bn_cnn", "method=oats"]


def _model(method_name: str, seed: int = 0, arch: str = "bn_cnn", overrides=()):
    torch.manual_seed(seed)
    cfg = checked([*TINY, "arch=bn_cnn", f"method={method_name}", *overrides])
    method = build_method(cfg.method, SimpleNamespace(num_classes=4, shape=SHAPE))
    model = build_model(arch, num_classes=4, in_shape=SHAPE, mean=[0.0], std=[1.0])
    return method, method.wrap_model(model, {})


def _at(model, width: float, lam: float = 0.3):
    return bind(model, FixedSlim(width, FixedLambda(lam, LAMBDAS)))


def test_width_one_is_oat_with_the_same_weights():
    _, oat = _model("oat", seed=0)
    _, oats = _model("oats", seed=1)
    full = f"per_width.{WIDTHS.index(1.0)}."
    oat_state = oat.state_dict()
    oats.load_state_dict({k: oat_state.get(k.replace(full, ""), v) for k, v in oats.state_dict().items()})
    x = torch.rand(8, *SHAPE)
    values = torch.tensor([0.0, 0.3, 1.0, 0.0, 0.1, 0.2, 0.4, 0.3])
    for train in (False, True):
        oat.train(train), oats.train(train)
        expected = oat(x, cond=Lambdas.of(values, LAMBDAS, "cpu"))
        assert torch.equal(oats(x, cond=Slim(1.0, Lambdas.of(values, LAMBDAS, "cpu"))), expected)


def test_the_widths_share_one_film_and_add_only_their_dual_bns():
    _, oat = _model("oat")
    _, oats = _model("oats")
    bn_channels = (16, 32)  # bn_cnn's two BatchNorms
    narrower = sum(2 * 2 * math.ceil(w * c) for w in WIDTHS[:-1] for c in bn_channels)  # (clean, adv) x (weight, bias)
    assert sum(p.numel() for p in oats.parameters()) == sum(p.numel() for p in oat.parameters()) + narrower
    assert all(block.per_width[0].film is None for block in oats.modules() if isinstance(block, SlimFiLMDualBN))


def test_a_narrow_width_reads_only_its_first_channels():
    _, model = _model("oats")
    model.eval()
    x = torch.rand(5, *SHAPE)
    used = {}

    def record(layer, inputs, out):
        used[layer] = (inputs[0].shape[1], out.shape[1])

    layers = [m for m in model.modules() if isinstance(m, (SlimConv2d, SlimLinear))]
    handles = [layer.register_forward_hook(record) for layer in layers]
    with torch.no_grad():
        before = _at(model, 0.5)(x)
        for handle in handles:
            handle.remove()
        wide = _at(model, 1.0)(x)
        assert used[model.head][1] == 4 and used[model.body[0]] == (1, 8)  # classes and image channels never slim
        for layer, (n_in, n_out) in ((m, used[m]) for m in layers if m in used):
            if layer is model.head:
                n_out = layer.out_features
            layer.weight[n_out:].normal_()
            layer.weight[:, n_in:].normal_()
            if layer.bias is not None:
                layer.bias[n_out:].normal_()
        for block in (m for m in model.modules() if isinstance(m, SlimFiLMDualBN)):
            for wider in block.per_width[1:]:
                for p in wider.parameters():
                    p.normal_()
        assert torch.equal(_at(model, 0.5)(x), before)
        assert not torch.equal(_at(model, 1.0)(x), wide)


def test_flops_grow_with_width_and_match_a_hand_count():
    method, model = _model("oats")
    flops = [method.width_flops[w] for w in WIDTHS]
    assert flops[0] < flops[1] < flops[2]
    # bn_cnn on 1x12x12, 4 classes: conv 1->16 k4 s2 to 6x6, conv 16->32 k4 s2 to 3x3, Linear 288->100, head 100->4,
    # and the FiLM MLPs Linear(128, 2C), Linear(2C, 2C) after each BN (C = 16, 32).
    film = sum(128 * 2 * c + 2 * c * 2 * c for c in (16, 32))
    assert flops[2] == 36 * 16 * 16 + 9 * 32 * 16 * 16 + 288 * 100 + 100 * 4 + film
    for w in WIDTHS:  # torch's own counter: two FLOPs per multiply-add
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            _at(model.eval(), w)(torch.zeros(1, *SHAPE))
        assert counter.get_total_flops() == 2 * method.width_flops[w] == 2 * forward_flops(
            model, SHAPE, FixedSlim(w, FixedLambda(0.0, LAMBDAS)))


def test_an_arch_that_cannot_be_slimmed_is_refused_in_one_line():
    with pytest.raises(ConfigError, match="arch=mnist_net cannot be slimmed: choose one of bn_cnn, "):
        _model("oats", arch="mnist_net")
    with pytest.raises(ConfigError, match="arch=mnist_net cannot be slimmed"):  # by the config check, before any data
        checked([*TINY, "method=oats"])


def _one_step(method, model):
    ctx = make_context(model)
    optimizer_steps = []
    step = ctx.optimizer.step
    ctx.optimizer.step = lambda *a, **k: optimizer_steps.append(1) or step(*a, **k)
    torch.manual_seed(0)
    batch = SimpleNamespace(x=torch.rand(12, *SHAPE), y=torch.randint(0, 4, (12,)))
    model.train()
    out = method.train_step(batch, ctx)
    return ctx, optimizer_steps, out


def test_one_step_updates_once_and_every_width_keeps_its_own_bn_statistics():
    method, model = _model("oats", overrides=["method.steps=2"])
    blocks = [m for m in model.modules() if isinstance(m, SlimFiLMDualBN)]

    def stats():
        return [[(b.bn_clean.running_mean.clone(), b.bn_adv.running_mean.clone()) for b in blk.per_width]
                for blk in blocks]

    start = stats()
    ctx, optimizer_steps, out = _one_step(method, model)
    assert optimizer_steps == [1] and ctx.updates == 1 and torch.isfinite(out["loss"])
    after = stats()
    for blk_start, blk_after in zip(start, after):
        for (clean0, adv0), (clean1, adv1) in zip(blk_start, blk_after):
            assert not torch.equal(clean0, clean1) and not torch.equal(adv0, adv1)  # every width ran
    with torch.no_grad():  # one width alone: only its statistics move
        model(torch.rand(6, *SHAPE), cond=Slim(0.75, Lambdas.of([0.0, 0.3] * 3, LAMBDAS, "cpu")))
    for blk_before, blk_now in zip(after, stats()):
        for i, ((clean0, adv0), (clean1, adv1)) in enumerate(zip(blk_before, blk_now)):
            moved = WIDTHS[i] == 0.75
            assert (not torch.equal(clean0, clean1)) == moved and (not torch.equal(adv0, adv1)) == moved


def test_passes_count_each_width_at_its_share_of_the_full_width_flops():
    method, model = _model("oats", overrides=["method.steps=2"])
    ctx, _, _ = _one_step(method, model)
    n, n_zero = 12, math.ceil(12 / len(LAMBDAS))
    shares = [method.width_flops[w] / method.width_flops[1.0] for w in WIDTHS]
    assert ctx.counter.total == pytest.approx(sum(r * (n + (n - n_zero) * (2 + 1)) for r in shares))


def _views():
    return [f"width={w:g},lambda={v:g}" for w in reversed(WIDTHS) for v in LAMBDAS]


@pytest.mark.slow
def test_a_run_writes_every_view_with_its_flops_and_its_views_load(tmp_path):
    run_dir, args = tmp_path / "oats", [*OATS, "trainer.epochs=1", "method.steps=2", "dataset.n_train=256"]
    proc = run_cli([*args, f"hydra.run.dir={run_dir}"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    results = json.loads((run_dir / "results.json").read_text())
    assert list(results["views"]) == list(results["flops"]) == _views()
    assert results["flops"]["width=0.5,lambda=0"] < results["flops"]["width=0.75,lambda=0"] < \
        results["flops"]["width=1,lambda=0"] == results["flops"]["width=1,lambda=0.3"]
    shares = [results["flops"][f"width={w:g},lambda=0"] / results["flops"]["width=1,lambda=0"] for w in WIDTHS]
    assert results["passes_per_example"] == pytest.approx(sum(r * (1 + (64 - 11) / 64 * (2 + 1)) for r in shares))

    cfg = checked(args)
    test = build_data(cfg.dataset, device=torch.device("cpu"), seed=cfg.seed, batch_size=64).test
    name = "width=0.5,lambda=0.3"
    model = advtrain.load_model(run_dir / "checkpoints" / "last.pt", view=name)
    scores = results["views"][name]
    with torch.no_grad():
        correct = sum(int((model(x).argmax(1) == y).sum()) for x, y in test.batches(64, scores["n"]))
    assert correct / scores["n"] == scores["clean"]

    checkpoint = run_dir / "checkpoints" / "last.pt"
    proc = run_cli([f"checkpoint={checkpoint}", "attack=[pgd20]", f"hydra.run.dir={tmp_path / 'eval'}"], cwd=tmp_path,
                   program="advtrain-eval")
    assert proc.returncode == 0, proc.stderr
    evaluated = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert evaluated["flops"] == results["flops"] and evaluated["views"][name]["clean"] == scores["clean"]


def test_eval_widths_and_lambdas_pick_the_evaluated_views():
    method = build_method(checked([*OATS, "method.eval_widths=[0.5,1.0]", "method.eval_lambdas=[0.0,1.0]"]).method,
                          SimpleNamespace(num_classes=4, shape=(1, 12, 12)))
    method.width_flops = {w: 1 for w in WIDTHS}  # set by wrap_model; the names are what is tested
    assert [v.name for v in method.eval_views()] == ["width=1,lambda=0", "width=1,lambda=1", "width=0.5,lambda=0",
                                                     "width=0.5,lambda=1"]
    assert [v.name for v in method.views()] == _views()
    with pytest.raises(ConfigError, match=r"method.eval_widths=\[0.25\]: expected a non-empty list of values of "
                                          r"method.widths=\[0.5, 0.75, 1.0\]"):
        build_method(checked([*OATS, "method.eval_widths=[0.25]"]).method, SimpleNamespace(num_classes=4))
