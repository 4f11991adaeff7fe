"""DEAT and its schedules: the rules against hand-computed sequences, the replay engine FREE and DEAT share, G under
fp16 loss scaling, resume mid-epoch, the "M+" schedule of PGD-AT and TRADES, and a run of the command."""
from __future__ import annotations

import json
import os
import signal

import pytest
import torch
from torch import nn

from advtrain.attacks import pgd
from advtrain.config import ConfigError
from advtrain.data import Batch
from advtrain.engine.run import train
from advtrain.engine.signals import Interrupted
from advtrain.methods import build_method
from advtrain.methods.deat import DEAT
from advtrain.attacks.losses import get_loss
from advtrain.methods.schedules import AccuracyRule, FixedRule, GradMagnitude, MagnitudeRule
from conftest import checked, make_context, run_cli

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: 1 thread, restored afterwards

SYNTH = ["dataset=synthetic", "arch=mnist_net", "logger=none", "trainer.progress=off", "dataset.n_train=512",
         "dataset.n_test=64", "trainer.batch_size=48", "attack=[]"]  # 512 = 10 full batches + a short one


def run(tmp_path, overrides):
    return train(checked(SYNTH + overrides), tmp_path)


def weights(run_dir):
    return torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)


# --- the rules -------------------------------------------------------------------------------------------------
def drive(rule, gs=None, accs=None):
    """Run a rule over epochs; per epoch: (count the epoch ran, threshold G was compared with)."""
    n = len(gs if gs is not None else accs)
    rows = []
    for t in range(n):
        rows.append((rule.count, rule.threshold))
        rule.after_epoch(t, g=gs[t] if gs else None, acc=accs[t] if accs else None)
    return rows


def test_magnitude_rule_follows_a_hand_computed_sequence():
    rule = MagnitudeRule(start=1, most=4, gamma=1.01)
    gs = [5.0, 10.0, 10.0, 10.2, 10.3, 20.0, 100.0]
    assert drive(rule, gs) == [
        (1, None),     # epoch 0: r = 1; afterwards r = 2 whatever G is
        (2, None),     # epoch 1: sets thr = 1.01 * 10 = 10.1, r stays
        (2, pytest.approx(10.1)),    # 10.0 <= 10.1: no increase, thr unchanged
        (2, pytest.approx(10.1)),    # 10.2 > 10.1: r = 3, thr re-anchored at 1.01 * 10.2
        (3, pytest.approx(10.302)),  # 10.3 <= 10.302: no increase
        (3, pytest.approx(10.302)),  # 20 > 10.302: r = 4 = r_max, thr = 20.2
        (4, pytest.approx(20.2)),    # 100 > 20.2, but r is at r_max: neither r nor thr moves
    ]
    assert (rule.count, rule.threshold) == (4, pytest.approx(20.2))


def test_magnitude_rule_for_attack_steps_also_grows_until_the_steps_reach_the_edge():
    # M+ with alpha 2/255, eps 8/255: K grows while alpha * K < eps even though G keeps falling; 4 steps reach it.
    rule = MagnitudeRule(start=0, most=10, gamma=1.01, alpha=2 / 255, eps=8 / 255)
    gs = [0.0, 100.0, 90.0, 80.0, 70.0, 60.0, 50.0, 61.0]
    rows = drive(rule, gs)
    assert [k for k, _ in rows] == [0, 1, 1, 2, 3, 4, 4, 4]
    assert [thr for _, thr in rows][2:] == pytest.approx([101.0, 90.9, 80.8, 70.7, 70.7, 70.7])
    assert rule.count == 4  # 50 and 61 are below 70.7, and 4 * 2/255 = 8/255 is not short of the edge


def test_fixed_and_accuracy_rules():
    fixed = FixedRule(start=1, most=5, d=3)
    assert [r for r, _ in drive(fixed, gs=[0.0] * 15)] == [1, 1, 1, 2, 2, 2, 3, 3, 3, 4, 4, 4, 5, 5, 5]
    accuracy = AccuracyRule(start=1, most=3, p=0.4)
    rows = drive(accuracy, accs=[0.3, 0.41, 0.4, 0.5, 0.9, 0.9])
    assert [r for r, _ in rows] == [1, 1, 2, 2, 3, 3] and accuracy.count == 3  # 0.4 is not above p; capped at 3


def test_rule_state_round_trips():
    rule = MagnitudeRule(start=1, most=8, gamma=1.01)
    drive(rule, [1.0, 2.0, 3.0])
    fresh = MagnitudeRule(start=1, most=8, gamma=1.01)
    fresh.load_state_dict(rule.state_dict())
    for t, g in enumerate([1.0, 5.0, 9.0], start=3):
        assert rule.after_epoch(t, g=g) == fresh.after_epoch(t, g=g)
    assert fresh.threshold == rule.threshold


def test_grad_magnitude_is_agreed_over_ranks():
    class TwoRanks:  # what a peer with G = 5 would add
        def sum(self, values):
            return [v + 5.0 for v in values]

    g = GradMagnitude()
    g.add(torch.tensor([[-1.0, 2.0]]), scale=3)
    assert isinstance(g.total, torch.Tensor)  # still on the device: adding never synced
    assert g.read(TwoRanks()) == 9.0 + 5.0 and g.total == 0.0


# --- one replay engine -----------------------------------------------------------------------------------------
def test_deat_with_carried_delta_and_fixed_r_performs_exactly_free_updates(tmp_path):
    m = 3
    run(tmp_path / "free", ["method=free", f"method.replays={m}", "trainer.epochs=2"])
    run(tmp_path / "deat", ["method=deat", "method.rule=fixed", f"method.replays={m}", f"method.r_max={m}",
                            "method.alpha=${method.eps}", "method.carry=true", "trainer.epochs=2"])
    free, deat = weights(tmp_path / "free"), weights(tmp_path / "deat")
    assert free["model"].keys() == deat["model"].keys()
    for k in free["model"]:
        assert torch.equal(free["model"][k], deat["model"][k]), k
    assert torch.equal(free["method"]["delta"], deat["method"]["delta"])
    assert free["counter"]["total"] == deat["counter"]["total"] == 2 * m * 512


def _deat_steps(scaler=None, fp16=False, batches=4, replays=3):
    """A few DEAT minibatches on a small conv net; returns (method, model)."""
    cfg = checked(["method=deat", "dataset=synthetic", f"method.replays={replays}"]).method
    method = build_method(cfg, None)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 10 * 10, 4))
    autocast = (lambda: torch.autocast("cpu", dtype=torch.float16)) if fp16 else None
    ctx = make_context(model, scaler=scaler, autocast=autocast)
    for _ in range(batches):
        x, y = torch.rand(16, 1, 12, 12), torch.randint(0, 4, (16,))
        with ctx.autocast():
            method.train_step(Batch(x, y, torch.arange(16), None, None), ctx)
    return method, model


def test_replays_attack_pixels_that_sit_on_the_image_box():
    # MNIST's background is 0 and a projected start leaves half of it at delta = 0: x + delta sits on the box's bound.
    # torch.clamp's gradient there is 0 in recent PyTorch, which would freeze those pixels for every replay; the replay
    # engine keeps the gradient the papers' PyTorch gave (1 on the closed box, 0 strictly outside it).
    from advtrain.methods.replay import into_box, replay
    v = torch.tensor([-0.1, 0.0, 0.5, 1.0, 1.2], requires_grad=True)
    into_box(v).sum().backward()
    assert v.grad.tolist() == [0.0, 1.0, 1.0, 1.0, 0.0]

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 10 * 10, 4))
    x, y = torch.zeros(16, 1, 12, 12), torch.randint(0, 4, (16,))
    x[:, :, 4:8, 4:8] = 1.0  # a white square on black: every pixel on a bound of the box
    out = replay(make_context(model), x, y, torch.zeros_like(x), replays=2, step=0.3, eps=0.3)
    moved = out.delta != 0
    assert moved.float().mean() > 0.3  # the clamp's zero subgradient would leave delta = 0 everywhere
    assert out.delta.abs().max() <= 0.3 and ((x + out.delta) >= 0).all() and ((x + out.delta) <= 1).all()


def test_g_does_not_see_the_loss_scale():
    # In fp32 a power-of-two scale and its removal are exact: with the scale removed everywhere, G and the weights are
    # bit-identical to an unscaled run. A scale leaking into G would multiply it by 2**20.
    plain, plain_model = _deat_steps()
    scaled, scaled_model = _deat_steps(torch.amp.GradScaler("cpu", init_scale=2.0 ** 20))
    assert plain.grad_mag.total > 0 and torch.equal(plain.grad_mag.total, scaled.grad_mag.total)
    assert all(torch.equal(a, b) for a, b in zip(plain_model.parameters(), scaled_model.parameters()))


def test_g_under_fp16_autocast_is_independent_of_the_scale_and_survives_an_overflow():
    small, _ = _deat_steps(torch.amp.GradScaler("cpu", init_scale=2.0 ** 4), fp16=True)
    large, _ = _deat_steps(torch.amp.GradScaler("cpu", init_scale=2.0 ** 12), fp16=True)
    assert float(large.grad_mag.total) == pytest.approx(float(small.grad_mag.total), rel=1e-2)
    # 2**40 overflows fp16 on the first update, the first minibatch's only replay: the scaler skips that step and
    # backs off; G, the weights and delta stay finite.
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 40, backoff_factor=2.0 ** -30)
    method, model = _deat_steps(scaler, fp16=True, replays=1)
    assert scaler.get_scale() < 2.0 ** 40
    assert torch.isfinite(method.grad_mag.total) and method.grad_mag.total > 0
    assert all(torch.isfinite(p).all() for p in model.parameters())


# --- checkpoints -----------------------------------------------------------------------------------------------
def test_resume_mid_epoch_takes_the_same_schedule_and_weights(tmp_path, monkeypatch):
    args = ["method=deat", "trainer.epochs=4"]
    straight = run(tmp_path / "straight", args)

    step = DEAT.train_step

    def interrupted_step(self, batch, ctx):
        out = step(self, batch, ctx)
        if (ctx.epoch, ctx.batch_idx) == (2, 4):  # mid-epoch, after the threshold is set: G's partial sum matters
            os.kill(os.getpid(), signal.SIGUSR1)
        return out

    monkeypatch.setattr(DEAT, "train_step", interrupted_step)
    with pytest.raises(Interrupted):
        run(tmp_path / "resumed", args)
    ckpt = weights(tmp_path / "resumed")
    assert (ckpt["loop"]["epoch"], ckpt["loop"]["batch"]) == (2, 5) and ckpt["method"]["G"]["total"] > 0
    monkeypatch.undo()
    resumed = run(tmp_path / "resumed", args)

    keys = ("method/replays", "method/G", "method/threshold")
    schedule = [{k: h.get(k) for k in keys} for h in straight["history"]]
    assert schedule == [{k: h.get(k) for k in keys} for h in resumed["history"]]
    assert [s["method/replays"] for s in schedule] == [1, 2, 2, 3]  # G grows fast on this data: the rule fires
    a, b = weights(tmp_path / "straight")["model"], weights(tmp_path / "resumed")["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


# --- the M+ schedule of PGD-AT and TRADES -----------------------------------------------------------------------
@pytest.mark.parametrize("loss", ["ce", "kl"])
def test_last_grad_hook_sees_the_last_steps_gradient_and_changes_nothing(loss):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 3))
    x, y = torch.rand(8, 1, 4, 4), torch.randint(0, 3, (8,))
    kw = dict(eps=0.1, alpha=0.03, loss=loss, start="uniform" if loss == "ce" else "normal")
    if loss == "kl":
        kw["target"] = torch.softmax(model(x), 1).detach()
    for steps in (0, 1, 3):
        torch.manual_seed(steps)
        want = pgd(model, x, y, steps=steps, **kw)
        torch.manual_seed(steps)
        before_last = pgd(model, x, y, steps=max(steps - 1, 0), **kw)
        seen = []
        torch.manual_seed(steps)
        got = pgd(model, x, y, steps=steps, last_grad=seen.append, **kw)
        assert torch.equal(got, want) and len(seen) == min(steps, 1)
        if steps:  # the gradient at the point the last step started from
            x_last = before_last.requires_grad_(True)
            target = kw.get("target")
            loss_value = get_loss(loss)(model(x_last), y, target).sum()
            (expected,) = torch.autograd.grad(loss_value, x_last)
            assert torch.allclose(seen[0], expected)


@pytest.mark.parametrize("method,passes", [
    ("pgd", [1, 2, 2, 3]),                      # K + 1, with K = 0, 1, 1, 2
    ("trades", [1, 1 + 2 + 1 / 3, 1 + 2 + 1 / 3, 2 + 2 + 1 / 3]),  # K = 0 is one clean update
])
def test_magnitude_schedule_grows_attack_steps_from_clean_training(tmp_path, method, passes):
    # Synthetic data: eps 0.1, alpha 0.025, so K is also forced up while 0.025 * K < 0.1.
    results = run(tmp_path, [f"method={method}", "method.steps_schedule=magnitude", "method.steps=3",
                             "trainer.epochs=4"])
    history = results["history"]
    assert [h["method/attack_steps"] for h in history] == [0, 1, 1, 2]
    assert history[0]["method/G"] == 0 and history[1]["method/G"] > 0  # no attack, no gradient in epoch 0
    assert "method/threshold" not in history[1]
    assert history[2]["method/threshold"] == pytest.approx(1.01 * history[1]["method/G"])
    assert results["passes_per_example"] == pytest.approx(sum(passes) / 4)
    ckpt = weights(tmp_path)["method"]
    assert ckpt["steps"] == 3 and ckpt["schedule"]["count"] == 3


def test_unscheduled_steps_method_logs_and_saves_what_it_did_before():
    method = build_method(checked(["method=pgd", "dataset=synthetic"]).method, None)
    assert method.schedule is None and method.state_dict() == {"steps": 7}


# --- config ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("overrides,message", [
    (["method=deat", "method.rule=x"], "method.rule='x' is not valid; choose one of: fixed, accuracy, magnitude"),
    (["method=pgd", "method.steps_schedule=linear"],
     "method.steps_schedule='linear' is not valid; choose one of: none, magnitude"),
])
def test_bad_choices_fail_with_one_line(overrides, message):
    with pytest.raises(ConfigError) as e:
        checked(["dataset=synthetic", *overrides])
    assert str(e.value) == message


def test_rule_caps_default_to_the_papers_and_bad_counts_fail():
    caps = {rule: build_method(checked(["method=deat", "dataset=synthetic", f"method.rule={rule}"]).method,
                               None).rule.most for rule in ("fixed", "accuracy", "magnitude")}
    assert caps == {"fixed": 5, "accuracy": 4, "magnitude": 8}
    with pytest.raises(ConfigError, match="replays <= r_max"):
        build_method(checked(["method=deat", "dataset=synthetic", "method.replays=9"]).method, None)


# --- the command -----------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_deat_command_grows_replays_and_logs_the_schedule(tmp_path):
    args = ["method=deat", "dataset=synthetic", "arch=mnist_net", "logger=none", "trainer.epochs=5",
            "trainer.batch_size=64", "dataset.n_train=512", "dataset.n_test=64", "attack=[fgsm]",
            "trainer.progress=lines", f"hydra.run.dir={tmp_path}"]
    proc = run_cli(args, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    history = json.loads((tmp_path / "results.json").read_text())["history"]
    r = [h["method/replays"] for h in history]
    assert r[0] == 1 and r[1] == 2 and r[-1] > 2  # epoch 0's increase, then at least one that G decided
    for t in range(2, len(history) - 1):  # the logged values explain every decision
        assert r[t + 1] == r[t] + (history[t]["method/G"] > history[t]["method/threshold"] and r[t] < 8)
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["passes_per_example"] == pytest.approx(sum(r) / len(r))
    assert "method/replays 1" in proc.stdout and "method/G " in proc.stdout and "method/threshold " in proc.stdout


@pytest.mark.slow
def test_two_ranks_agree_on_g_and_take_the_single_process_schedule(tmp_path):
    # carry=true starts from zeros, so no random draw differs between ranks; mnist_net has no BN; batch 63 splits
    # unevenly (31/32) and 504 = 8 * 63 keeps each rank's buffer rows on the same examples as the single process's.
    # G summed over the ranks must be the single process's G: per-example gradients, all examples.
    args = ["method=deat", "method.carry=true", "method.gamma=1.0", "dataset=synthetic", "arch=mnist_net",
            "logger=none", "trainer.epochs=4", "trainer.batch_size=63", "dataset.n_train=504", "dataset.n_test=64",
            "attack=[]", "trainer.progress=off", "trainer.deterministic=true"]
    for devices in (1, 2):
        proc = run_cli([*args, f"trainer.devices={devices}", f"hydra.run.dir={tmp_path / str(devices)}"], cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr
    one, two = (json.loads((tmp_path / d / "results.json").read_text())["history"] for d in ("1", "2"))
    assert [h["method/replays"] for h in two] == [h["method/replays"] for h in one]
    assert [h["method/G"] for h in two] == pytest.approx([h["method/G"] for h in one], rel=1e-4)
    a, b = weights(tmp_path / "1")["model"], weights(tmp_path / "2")["model"]
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=0, msg=k)
