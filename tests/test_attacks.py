"""Behaviour of advtrain.attacks on tiny CPU models (whole file: about 12 s on 2 cores)."""
import logging

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from advtrain.attacks import (AutoAttackEval, PassCounter, bn_mode, build_attack, fgsm, pgd, project,
                              random_init)

N_CLASSES = 10
EPS = {'linf': 8 / 255, 'l2': 0.5}      # pixel units of [0,1]
ALPHA = {'linf': 2 / 255, 'l2': 0.125}


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: 1 thread, restored afterwards


class SmallCNN(nn.Module):
    """conv-BN-relu-pool-dropout-linear on 3x16x16 inputs in [0,1]; normalization inside, like the real models."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.drop = nn.Dropout(0.2)
        self.fc = nn.Linear(8 * 8 * 8, N_CLASSES)

    def forward(self, x):
        x = (x - 0.5) / 0.25
        x = F.max_pool2d(F.relu(self.bn(self.conv(x))), 2)
        return self.fc(self.drop(x).flatten(1))


def make_model(seed=0):
    torch.manual_seed(seed)
    model = SmallCNN()
    with torch.no_grad():  # non-trivial BN statistics so eval and train mode really differ
        model.train()(torch.rand(64, 3, 16, 16))
    return model.eval()


def make_data(n, seed=0):
    """Trivially separable task: each class is a fixed random ±1 pattern around grey, plus noise."""
    patterns = torch.sign(torch.randn(N_CLASSES, 3, 16, 16, generator=torch.Generator().manual_seed(123)))
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, N_CLASSES, (n,), generator=g)
    x = (0.5 + 0.05 * patterns[y] + 0.1 * torch.randn(n, 3, 16, 16, generator=g)).clamp(0, 1)
    return x, y


@pytest.fixture(scope='module')
def trained():
    model = make_model(1).train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for step in range(100):
        x, y = make_data(64, seed=1000 + step)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    return model.eval()


def rand_batch(n=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, 16, 16, generator=g), torch.randint(0, N_CLASSES, (n,), generator=g)


def perturbation(x_adv, x, norm):
    d = (x_adv - x).flatten(1)
    return d.abs().amax(1) if norm == 'linf' else d.norm(dim=1)


def assert_feasible(x_adv, x, eps, norm):
    assert x_adv.shape == x.shape and not x_adv.requires_grad
    assert perturbation(x_adv, x, norm).max().item() <= eps + 1e-6
    assert x_adv.min().item() >= 0.0 and x_adv.max().item() <= 1.0


def clean_prediction(model, x):
    with torch.no_grad():
        return model(x).argmax(1)


def mean_ce(model, x, y):
    with torch.no_grad():
        return F.cross_entropy(model(x), y).item()


def run_method(method, model, x, y, norm, **kw):
    eps, alpha = EPS[norm], ALPHA[norm]
    if method == 'fgsm':
        return fgsm(model, x, y, eps=eps, norm=norm, **kw)
    if method == 'trades':
        with torch.no_grad():
            p_clean = F.softmax(model(x), dim=1)
        return pgd(model, x, None, eps=eps, alpha=alpha, steps=5, norm=norm, loss='kl', target=p_clean,
                   start='normal', **kw)
    extra = {'pgd': {}, 'restarts': {'restarts': 3}, 'cw': {'loss': 'cw'}, 'best': {'record_best': True}}[method]
    return pgd(model, x, y, eps=eps, alpha=alpha, steps=5, norm=norm, **extra, **kw)


METHODS = ['fgsm', 'pgd', 'restarts', 'cw', 'trades', 'best']


# --- geometry ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize('norm', ['linf', 'l2'])
def test_project_lands_in_ball_and_box_and_keeps_feasible_points(norm):
    x, _ = rand_batch(6)
    far = x + 3 * torch.randn_like(x)
    assert_feasible(project(far, x, EPS[norm], norm), x, EPS[norm], norm)
    inside = project(x + 1e-3 * torch.randn_like(x), x, EPS[norm], norm)
    torch.testing.assert_close(project(inside, x, EPS[norm], norm), inside)


@pytest.mark.parametrize('norm', ['linf', 'l2'])
def test_random_init_kinds(norm):
    x, _ = rand_batch(16)
    eps = EPS[norm]
    assert torch.equal(random_init(x, eps, norm, 'none'), x)
    uniform = random_init(x, eps, norm, 'uniform')
    assert_feasible(uniform, x, eps, norm)
    # linf: some pixel lands near ±eps; l2: in high dimension the uniform ball's mass sits at radius ≈ eps
    assert perturbation(uniform, x, norm).min() > 0.8 * eps
    normal = random_init(x, eps, norm, 'normal', std=1e-3)
    assert (normal - x).abs().max() < 1e-2
    with pytest.raises(ValueError, match='gauss'):
        random_init(x, eps, norm, 'gauss')


# --- pgd / fgsm ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize('norm', ['linf', 'l2'])
@pytest.mark.parametrize('method', METHODS)
def test_every_method_stays_in_ball_and_box(method, norm):
    model = make_model()
    x, y = rand_batch(8)
    assert_feasible(run_method(method, model, x, y, norm), x, EPS[norm], norm)


@pytest.mark.parametrize('norm', ['linf', 'l2'])
def test_attacks_raise_the_loss_and_pgd_beats_fgsm(trained, norm):
    x, y = make_data(64, seed=7)
    clean = mean_ce(trained, x, y)
    x_fgsm = fgsm(trained, x, y, eps=EPS[norm], norm=norm)
    x_pgd = pgd(trained, x, y, eps=EPS[norm], alpha=ALPHA[norm], steps=10, norm=norm)
    assert clean < mean_ce(trained, x_fgsm, y) <= mean_ce(trained, x_pgd, y)


@pytest.mark.parametrize('norm', ['linf', 'l2'])
def test_record_best_keeps_the_highest_loss_iterate(norm):
    model = make_model()
    x, y = rand_batch(16)
    kw = dict(eps=EPS[norm], alpha=EPS[norm], steps=4, norm=norm, start='none')  # full-size steps overshoot
    per_example = lambda x_: F.cross_entropy(model(x_), y, reduction='none').detach()
    last, best = pgd(model, x, y, **kw), pgd(model, x, y, record_best=True, **kw)
    assert (per_example(best) >= per_example(last) - 1e-6).all()
    assert (per_example(best) >= per_example(x) - 1e-6).all()  # x itself is the first iterate


def test_zero_steps_returns_projected_start_without_gradient_work():
    model, counter = make_model(), PassCounter()
    x, y = rand_batch(5)
    assert torch.equal(pgd(model, x, y, eps=0.1, alpha=0.1, steps=0, start='none', counter=counter), x)
    assert counter.total == 0
    torch.manual_seed(3)
    x_adv = pgd(model, x, y, eps=0.1, alpha=0.1, steps=0)
    torch.manual_seed(3)
    assert torch.equal(x_adv, random_init(x, 0.1, 'linf', 'uniform'))


@pytest.mark.parametrize('n', [1, 7, 13])
def test_batch_sizes(n):
    model = make_model()
    x, y = rand_batch(n)
    for norm in ('linf', 'l2'):
        assert_feasible(pgd(model, x, y, eps=EPS[norm], alpha=ALPHA[norm], steps=3, norm=norm), x, EPS[norm], norm)


@pytest.mark.parametrize('loss', ['ce', 'cw'])
@pytest.mark.parametrize('norm', ['linf', 'l2'])
def test_examples_are_attacked_independently_of_their_batch(norm, loss):
    model = make_model().train()  # bn='eval' (default) must still give per-example results
    x, y = rand_batch(13)
    kw = dict(eps=EPS[norm], alpha=ALPHA[norm], steps=5, norm=norm, loss=loss, start='none')
    full = pgd(model, x, y, **kw)
    torch.testing.assert_close(pgd(model, x[3:10], y[3:10], **kw), full[3:10], rtol=0, atol=1e-6)
    torch.testing.assert_close(pgd(model, x[5:6], y[5:6], **kw), full[5:6], rtol=0, atol=1e-6)


def test_channels_last_inputs_give_the_same_points():
    model = make_model()
    x, y = rand_batch(7)
    kw = dict(eps=EPS['linf'], alpha=ALPHA['linf'], steps=4, start='none')
    x_cl = x.contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(pgd(model, x_cl, y, **kw), pgd(model, x, y, **kw), rtol=0, atol=1e-6)


@pytest.mark.parametrize('method', METHODS)
def test_no_parameter_grad_is_created_or_changed(method):
    model = make_model()
    model.conv.weight.requires_grad_(False)  # a frozen parameter must stay frozen
    x, y = rand_batch(6)
    F.cross_entropy(model(x), y).backward()
    model.fc.bias.grad = None  # a mix of existing and absent .grad
    before = {n: (p.requires_grad, None if p.grad is None else p.grad.clone()) for n, p in model.named_parameters()}
    with torch.no_grad():  # the attack must enable gradients itself
        run_method(method, model, x, y, 'linf')
    for n, p in model.named_parameters():
        requires_grad, grad = before[n]
        assert p.requires_grad == requires_grad, n
        assert (p.grad is None) if grad is None else torch.equal(p.grad, grad), n


@pytest.mark.parametrize('bn', ['eval', 'train', 'keep'])
def test_bn_mode_applies_during_the_attack_and_restores_every_flag(bn):
    model = make_model().train()
    model.bn.eval()  # a submodule deliberately in another mode than the root
    flags = {n: m.training for n, m in model.named_modules()}
    seen = []
    model.bn.register_forward_pre_hook(lambda m, _: seen.append((m.training, model.drop.training)))
    x, y = rand_batch(4)
    pgd(model, x, y, eps=EPS['linf'], alpha=ALPHA['linf'], steps=2, bn=bn)
    expected = {'eval': (False, False), 'train': (True, True), 'keep': (False, True)}[bn]
    assert seen and all(s == expected for s in seen)
    assert {n: m.training for n, m in model.named_modules()} == flags


def test_bn_mode_restores_flags_on_error():
    model = make_model().train()
    model.drop.eval()
    with pytest.raises(RuntimeError), bn_mode(model, 'eval'):
        raise RuntimeError
    assert model.training and model.bn.training and not model.drop.training


# --- restarts ------------------------------------------------------------------------------------------------

def test_restarts_return_the_first_misclassified_start():
    """steps=0: each restart is a bare random point, so the choice rule can be replayed exactly."""
    model = make_model()
    x, _ = rand_batch(32)
    y = clean_prediction(model, x)  # all clean-correct, so only the random points decide
    eps, restarts = 0.25, 4
    torch.manual_seed(11)
    x_adv = pgd(model, x, y, eps=eps, alpha=0.1, steps=0, restarts=restarts)
    torch.manual_seed(11)
    starts = [random_init(x, eps, 'linf', 'uniform') for _ in range(restarts)]
    with torch.no_grad():
        wrong = torch.stack([model(s).argmax(1) != y for s in starts])  # (restarts, N)
    first = torch.where(wrong.any(0), wrong.float().argmax(0), restarts - 1)
    expected = torch.stack([starts[r][i] for i, r in enumerate(first.tolist())])
    assert (first > 0).any() and (first < restarts - 1).any()  # the case exercises the rule
    assert torch.equal(x_adv, expected)


def test_skip_fooled_restarts_attack_only_the_examples_still_standing():
    """Evaluation's restarts: each restart after the first sees only the examples no earlier restart fooled; the rule
    (first misclassified point, else the last restart's) is unchanged, replayed here start by start."""
    model, counter, sizes = make_model(), PassCounter(), []
    x, _ = rand_batch(32)
    y = clean_prediction(model, x)
    model.register_forward_pre_hook(lambda module, args: sizes.append(len(args[0])))
    eps, restarts = 0.25, 4
    torch.manual_seed(11)
    x_adv = pgd(model, x, y, eps=eps, alpha=0.1, steps=0, restarts=restarts, skip_fooled=True, counter=counter)

    seen = list(sizes)  # the batch sizes the attack's forwards had (steps=0: only the checks between restarts)
    torch.manual_seed(11)
    expected, open_, checked = x.clone(), torch.arange(len(x)), []
    with torch.no_grad():
        for r in range(restarts):
            start = random_init(x[open_], eps, 'linf', 'uniform')
            expected[open_] = start
            if r < restarts - 1:
                checked.append(len(open_))
                open_ = open_[model(start).argmax(1) == y[open_]]
    assert 0 < len(open_) < len(x)  # some examples were fooled early, some never
    assert torch.equal(x_adv, expected)
    assert seen == checked and checked[-1] < len(x)  # the checks, and so the restarts, shrink to the open examples
    assert counter.total == pytest.approx(sum(checked) / 3, abs=1e-12)  # a check forward per open example only


def test_skip_fooled_refuses_train_mode_batch_norm():
    x, y = rand_batch(4)
    with pytest.raises(ValueError, match="skip_fooled"):
        pgd(make_model(), x, y, eps=0.1, alpha=0.1, steps=1, restarts=2, bn='train', skip_fooled=True)


@pytest.mark.parametrize('norm', ['linf', 'l2'])
def test_more_restarts_never_help_the_defender(trained, norm):
    """Robust only if every restart fails: restart 0 replays the single run, so restarts can only add errors."""
    x, y = make_data(64, seed=5)
    eps = {'linf': 16 / 255, 'l2': 1.5}[norm]
    alpha = eps / 4  # one short step from a random start: a weak attack whose outcome depends on the start
    total_1 = total_3 = 0
    for seed in range(4):
        torch.manual_seed(seed)
        x1 = pgd(trained, x, y, eps=eps, alpha=alpha, steps=1, norm=norm)
        torch.manual_seed(seed)
        x3 = pgd(trained, x, y, eps=eps, alpha=alpha, steps=1, norm=norm, restarts=3)
        assert_feasible(x3, x, eps, norm)
        ok_1, ok_3 = clean_prediction(trained, x1) == y, clean_prediction(trained, x3) == y
        assert not (ok_3 & ~ok_1).any()  # per example: fooled once -> fooled with restarts
        total_1, total_3 = total_1 + ok_1.sum().item(), total_3 + ok_3.sum().item()
    assert total_3 < total_1  # and the extra restarts did find new adversarial examples


# --- cost accounting -----------------------------------------------------------------------------------------

def test_pass_counter_counts_steps_and_checks():
    model, counter = make_model(), PassCounter()
    x, y = rand_batch(7)
    kw = dict(eps=0.03, alpha=0.01, counter=counter)
    pgd(model, x, y, steps=5, **kw)
    assert counter.total == 35
    fgsm(model, x, y, eps=0.03, counter=counter)
    assert counter.total == 42
    counter.reset()
    pgd(model, x, y, steps=5, restarts=2, **kw)  # 2 runs + one check forward (1/3 pass) per example
    assert counter.total == pytest.approx(2 * 35 + 7 / 3, abs=1e-12)
    counter.reset()
    pgd(model, x, y, steps=5, restarts=3, **kw)  # a check after every restart but the last
    assert counter.total == pytest.approx(3 * 35 + 2 * 7 / 3, abs=1e-12)
    counter.reset()
    pgd(model, x, y, steps=5, record_best=True, **kw)  # scoring the last iterate: one forward
    assert counter.total == pytest.approx(35 + 7 / 3, abs=1e-12)
    restored = PassCounter()
    restored.load_state_dict(counter.state_dict())
    assert restored.total == counter.total


# --- mixed precision -----------------------------------------------------------------------------------------

@pytest.mark.parametrize('norm', ['linf', 'l2'])
def test_pgd_under_bf16_autocast(trained, norm):
    x, y = make_data(32, seed=9)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        x_adv = pgd(trained, x, y, eps=EPS[norm], alpha=ALPHA[norm], steps=5, norm=norm)
    assert x_adv.dtype == torch.float32
    assert_feasible(x_adv, x, EPS[norm], norm)
    assert mean_ce(trained, x_adv, y) > mean_ce(trained, x, y)


# --- AutoAttack ----------------------------------------------------------------------------------------------

def clean_correct(model, x, y):
    return clean_prediction(model, x) == y


@pytest.mark.parametrize('norm', ['linf', 'l2'])
def test_autoattack_custom_apgd(trained, norm):
    x, y = make_data(48, seed=3)
    eps = {'linf': 4 / 255, 'l2': 1.0}[norm]  # where the tiny model is partly robust
    trained.train()  # the adapter must evaluate in eval mode and hand the mode back
    robust = AutoAttackEval(eps=eps, norm=norm, version='custom', attacks=['apgd-ce'])(trained, x, y)
    assert trained.training
    trained.eval()
    assert robust.dtype == torch.bool and robust.shape == (48,)
    assert not (robust & ~clean_correct(trained, x, y)).any()  # robust implies clean-correct


def test_autoattack_eps_zero_is_clean_accuracy_and_leaves_rng_alone(trained):
    x, y = make_data(32, seed=4)
    y[:4] = (y[:4] + 1) % N_CLASSES  # some clean errors, so the comparison means something
    torch.manual_seed(0)
    state = torch.get_rng_state()
    robust = AutoAttackEval(eps=0.0, version='custom', attacks=['apgd-ce'])(trained, x, y)
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(robust, clean_correct(trained, x, y))


def test_autoattack_standard_small(trained):
    """The full standard suite; at 4/255 some points survive APGD-CE, so APGD-T, FAB-T and Square run too (~5 s)."""
    x, y = make_data(16, seed=6)
    robust = AutoAttackEval(eps=4 / 255, version='standard', batch_size=8)(trained, x, y)
    assert robust.dtype == torch.bool and robust.shape == (16,)
    assert robust.any() and not (robust & ~clean_correct(trained, x, y)).any()


def test_autoattack_logs_only_at_debug(trained, caplog):
    x, y = make_data(8)
    attack = AutoAttackEval(eps=8 / 255, version='custom', attacks=['apgd-ce'])
    caplog.set_level(logging.INFO)
    attack(trained, x, y)
    assert not [r for r in caplog.records if r.name == 'auto-attack']
    caplog.set_level(logging.DEBUG)
    attack(trained, x, y)
    assert [r for r in caplog.records if r.name == 'auto-attack']


def test_autoattack_refuses_points_outside_the_ball(trained, monkeypatch):
    from pyautoattack import AutoAttack
    monkeypatch.setattr(AutoAttack, 'run_standard_evaluation', lambda self, x, y, batch_size: (x + 0.1, y))
    x, y = make_data(4)
    with pytest.raises(RuntimeError, match='outside'):
        AutoAttackEval(eps=0.03, version='custom', attacks=['apgd-ce'])(trained, x, y)


def test_autoattack_rejects_bad_settings():
    with pytest.raises(ValueError, match='custom'):
        AutoAttackEval(eps=0.03, attacks=['apgd-ce'])
    with pytest.raises(ValueError, match='apgd-xx'):
        AutoAttackEval(eps=0.03, version='custom', attacks=['apgd-xx'])
    with pytest.raises(ValueError, match='l7'):
        AutoAttackEval(eps=0.03, norm='l7')


# --- suite ---------------------------------------------------------------------------------------------------

SUITE = {
    'fgsm': {'type': 'fgsm', 'eps': 8 / 255},
    'pgd20': {'type': 'pgd', 'eps': 8 / 255, 'alpha': 2 / 255, 'steps': 20, 'restarts': 1, 'norm': 'linf',
              'loss': 'ce'},
    'pgd_l2': {'type': 'pgd', 'eps': 0.5, 'alpha': 0.125, 'steps': 5, 'restarts': 2, 'norm': 'l2'},
    'cw10': {'type': 'cw', 'eps': 8 / 255, 'alpha': 2 / 255, 'steps': 10},
    'aa': {'type': 'autoattack', 'eps': 4 / 255, 'norm': 'linf', 'version': 'custom', 'seed': 0,
           'attacks': ['apgd-ce']},
}


@pytest.mark.parametrize('name', list(SUITE))
def test_build_attack_runs_each_type(trained, name):
    x, y = make_data(24, seed=8)
    attack = build_attack(name, SUITE[name])
    trained.train()
    with torch.autocast('cpu', dtype=torch.bfloat16):  # evaluation must switch to fp32 itself
        robust = attack(trained, x, y)
    assert trained.training
    trained.eval()
    assert robust.dtype == torch.bool and robust.shape == (24,)
    assert not (robust & ~clean_correct(trained, x, y)).any()


def test_build_attack_rejects_unknown_type_and_keys():
    with pytest.raises(ValueError, match="'deepfool'.*pgd"):
        build_attack('df', {'type': 'deepfool', 'eps': 0.03})
    with pytest.raises(ValueError, match="'stepz'.*steps"):
        build_attack('pgd', {'type': 'pgd', 'eps': 0.03, 'alpha': 0.01, 'stepz': 10})
    with pytest.raises(ValueError, match="'alpha'"):
        build_attack('pgd', {'type': 'pgd', 'eps': 0.03, 'steps': 10})
    with pytest.raises(ValueError, match="'loss'"):
        build_attack('cw', {'type': 'cw', 'eps': 0.03, 'alpha': 0.01, 'steps': 10, 'loss': 'ce'})


def test_pgd_rejects_inconsistent_arguments():
    model = make_model()
    x, y = rand_batch(3)
    with pytest.raises(ValueError, match='target'):
        pgd(model, x, y, eps=0.03, alpha=0.01, steps=1, loss='kl')
    with pytest.raises(ValueError, match='restarts'):
        pgd(model, x, None, eps=0.03, alpha=0.01, steps=1, loss='kl', restarts=2,
            target=torch.full((3, N_CLASSES), 1 / N_CLASSES))
    with pytest.raises(ValueError, match='linf'):
        pgd(model, x, y, eps=0.03, alpha=0.01, steps=1, norm='l1')


class _Quantized(nn.Module):
    """Gradient masking by construction: the input is rounded to 8 bits, whose gradient is zero everywhere, so
    every gradient attack is blind while a black-box attack (Square) sees the same model as before."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(torch.round(x * 255) / 255)


def test_autoattack_reports_gradient_masking_and_the_accuracy_after_each_attack(trained):
    x, y = make_data(32, seed=6)
    masked = _Quantized(trained).eval()
    attack = AutoAttackEval(eps=8 / 255, version='standard', batch_size=32)
    robust = attack(masked, x, y)
    after = attack.robust_after
    assert list(after) == ['apgd-ce', 'apgd-t', 'fab-t', 'square']
    assert after['square'] == int(robust.sum())  # the last attack's count is AutoAttack's verdict
    assert after['apgd-ce'] >= after['apgd-t'] >= after['fab-t'] > after['square']  # only the black box gets in
    assert any(w.startswith('Square Attack has decreased the robust accuracy') for w in attack.warnings)


def test_evaluation_records_autoattack_warnings_and_its_breakdown(trained):
    from advtrain.data.loader import TensorEvalSet
    from advtrain.engine.evaluate import evaluate

    x, y = make_data(32, seed=6)
    evalset = TensorEvalSet((x * 255).round().to(torch.uint8), y)
    warnings = []
    scores = evaluate(_Quantized(trained), evalset,
                      {'aa': {'type': 'autoattack', 'eps': 8 / 255, 'version': 'standard'}},
                      n=None, batch_size=16, warnings=warnings)
    assert {'aa/apgd-ce', 'aa/apgd-t', 'aa/fab-t', 'aa/square'} <= set(scores)
    assert scores['aa/square'] == scores['aa'] < scores['aa/apgd-ce'] <= scores['clean']
    assert len(warnings) == len(set(warnings)) and any('Square Attack' in w for w in warnings)  # once each
    # AutoAttack's percentages are those of the batch it checked (16 of the 32 here): the warning says so.
    assert all(w.startswith('aa, on an evaluation batch of 16 examples: ') for w in warnings)
