"""Behaviour of advtrain.models: shapes, the normalize/body/head contract, registry errors and the model helpers."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from advtrain.models import ARCHS, Classifier, build_model, count_parameters, find_head, replace_modules

MNIST_SHAPE = (1, 28, 28)
CIFAR_SHAPE = (3, 32, 32)
CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2471, 0.2435, 0.2616)
MNIST_MEAN, MNIST_STD = (0.1307,), (0.3081,)
SMALL_CNNS = ["madry_cnn", "mnist_net", "trades_smallcnn"]
# Every arch on CIFAR-like input, plus the small CNNs on the MNIST-like input they were written for.
CASES = [(name, CIFAR_SHAPE) for name in ARCHS] + [(name, MNIST_SHAPE) for name in SMALL_CNNS]
CASE_IDS = [f"{name}-{shape[0]}x{shape[1]}" for name, shape in CASES]


def make(name, in_shape=CIFAR_SHAPE, num_classes=10, **options):
    if name.startswith("wrn"):
        options = {"depth": 10, "widen_factor": 1, **options}  # keep CPU tests fast
    mean, std = (CIFAR_MEAN, CIFAR_STD) if in_shape[0] == 3 else (MNIST_MEAN, MNIST_STD)
    return build_model(name, num_classes=num_classes, in_shape=in_shape, mean=mean, std=std, **options)


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: 1 thread, restored afterwards


@pytest.fixture(scope="module")
def built():
    """built(name, in_shape): a fresh copy of a model built once per module, so tests may change it freely."""
    cache = {}

    def fresh_copy(name, in_shape):
        if (name, in_shape) not in cache:
            torch.manual_seed(0)
            cache[name, in_shape] = make(name, in_shape)
        return copy.deepcopy(cache[name, in_shape])

    return fresh_copy


def images(batch, in_shape, seed=1):
    return torch.rand(batch, *in_shape, generator=torch.Generator().manual_seed(seed))


def randomize_head(model):
    # trades_smallcnn starts with an all-zero head (as in TRADES), which would make every logit and input gradient
    # zero; a random head lets the checks below see through the whole network.
    nn.init.normal_(model.head.weight, std=0.1)
    return model


@pytest.mark.parametrize(("name", "in_shape"), CASES, ids=CASE_IDS)
def test_logits_and_features_feed_the_head(built, name, in_shape):
    model = built(name, in_shape).eval()
    x = images(3, in_shape)
    logits, features = model(x), model.features(x)
    assert isinstance(model, Classifier) and model.arch == name
    assert logits.shape == (3, 10) and model.num_classes == 10
    assert features.shape == (3, model.feature_dim)
    assert torch.equal(model.head(features), logits)


@pytest.mark.parametrize(("name", "in_shape"), CASES, ids=CASE_IDS)
def test_normalization_is_inside_the_model(built, name, in_shape):
    model = randomize_head(built(name, in_shape)).eval()
    x = images(2, in_shape)
    mean, std = (CIFAR_MEAN, CIFAR_STD) if in_shape[0] == 3 else (MNIST_MEAN, MNIST_STD)
    mean, std = torch.tensor(mean).view(1, -1, 1, 1), torch.tensor(std).view(1, -1, 1, 1)
    assert model.normalize.mean.shape == model.normalize.std.shape == (1, in_shape[0], 1, 1)
    torch.testing.assert_close(model(x), model.head(model.body((x - mean) / std)), rtol=1e-5, atol=1e-6)
    # The body alone must not be the same function, or the check above proves nothing.
    assert not torch.allclose(model(x), model.head(model.body(x)))


def test_single_mean_and_std_broadcast_over_channels():
    model = build_model("resnet18", num_classes=10, in_shape=CIFAR_SHAPE, mean=[0.5], std=[0.25])
    assert torch.equal(model.normalize.mean, torch.full((1, 3, 1, 1), 0.5))
    assert torch.equal(model.normalize.std, torch.full((1, 3, 1, 1), 0.25))
    assert {"normalize.mean", "normalize.std"} <= model.state_dict().keys()


@pytest.mark.parametrize(("name", "in_shape"), CASES, ids=CASE_IDS)
def test_input_gradient_flows_under_train_mode_batch_of_one(built, name, in_shape):
    model = randomize_head(built(name, in_shape)).train()
    x = images(1, in_shape).requires_grad_()
    F.cross_entropy(model(x), torch.tensor([3])).backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


@pytest.mark.parametrize("batch", [1, 7])
@pytest.mark.parametrize("name", list(ARCHS))
def test_eval_mode_output_does_not_depend_on_the_batch(built, name, batch):
    model = randomize_head(built(name, CIFAR_SHAPE)).eval()
    x = images(7, CIFAR_SHAPE)
    torch.testing.assert_close(model(x[:batch]), model(x)[:batch], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", list(ARCHS))
def test_channels_last_gives_the_same_logits(built, name):
    model = randomize_head(built(name, CIFAR_SHAPE)).eval()
    x = images(2, CIFAR_SHAPE)
    expected = model(x)
    model = model.to(memory_format=torch.channels_last)
    torch.testing.assert_close(model(x.to(memory_format=torch.channels_last)), expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", list(ARCHS))
def test_bf16_autocast_forward_and_input_gradient(built, name):
    model = randomize_head(built(name, CIFAR_SHAPE)).eval()
    x = images(2, CIFAR_SHAPE).requires_grad_()
    expected = model(x).detach()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(x)
    assert logits.dtype == torch.bfloat16
    assert (logits.float() - expected).abs().max() <= 0.1 * expected.abs().max() + 1e-3
    F.cross_entropy(logits.float(), torch.tensor([0, 1])).backward()
    assert x.grad.dtype == torch.float32 and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


@pytest.mark.parametrize(("name", "in_shape"), CASES, ids=CASE_IDS)
def test_state_dict_round_trips_through_weights_only_load(built, name, in_shape, tmp_path):
    model = randomize_head(built(name, in_shape)).train()
    model(images(4, in_shape, seed=2))  # move BN running statistics off their initial values
    model.eval()
    torch.save(model.state_dict(), tmp_path / "model.pt")

    torch.manual_seed(123)
    restored = make(name, in_shape).eval()
    x = images(2, in_shape)
    assert not torch.equal(restored.features(x), model.features(x))
    restored.load_state_dict(torch.load(tmp_path / "model.pt", weights_only=True))
    assert torch.equal(restored.features(x), model.features(x))
    assert torch.equal(restored(x), model(x))


def test_published_parameter_counts():
    def count(name):
        return count_parameters(build_model(name, num_classes=10, in_shape=CIFAR_SHAPE, mean=CIFAR_MEAN, std=CIFAR_STD))

    assert count("wrn34_10") == 46_160_474  # the 46.2M of TRADES / RobustBench
    # 11.17M: kuangliu's PreActResNet18 (11,171,146) plus the final 512-channel BN of Wong et al.'s version.
    assert count("preact_resnet18") == 11_172_170
    assert count("resnet18") == 11_173_962


def test_wrn_options_override_the_name_and_init_follows_trades():
    model = make("wrn34_10", depth=16, widen_factor=2, dropout=0.3)
    assert model.feature_dim == 128
    assert len(model.body.block1.layer) == 2
    assert all(block.dropout.p == 0.3 for block in model.body.block1.layer)
    assert not model.head.bias.any()
    conv = model.body.block3.layer[1].conv2  # 128 -> 128 channels, 3x3: std sqrt(2 / fan_out)
    assert conv.weight.std().item() == pytest.approx((2 / (9 * 128)) ** 0.5, rel=0.05)


def test_resnet_switches_to_the_imagenet_stem_at_64_pixels():
    small, large = make("resnet18", (3, 63, 63)), make("resnet18", (3, 64, 64))
    assert small.body.conv1.kernel_size == (3, 3) and isinstance(small.body.maxpool, nn.Identity)
    assert large.body.conv1.kernel_size == (7, 7) and isinstance(large.body.maxpool, nn.MaxPool2d)
    assert large.eval()(images(2, (3, 64, 64))).shape == (2, 10)


@pytest.mark.parametrize("name", SMALL_CNNS)
def test_small_cnns_size_their_first_linear_from_the_input(name):
    def first_linear(model):
        return next(m for m in model.body.modules() if isinstance(m, nn.Linear))

    mnist, cifar = make(name, MNIST_SHAPE), make(name, CIFAR_SHAPE)
    assert first_linear(cifar).in_features > first_linear(mnist).in_features


def test_trades_smallcnn_follows_the_reference_init():
    model = make("trades_smallcnn", MNIST_SHAPE)
    assert not model.head.weight.any() and not model.head.bias.any()
    assert not model.body.conv1.bias.any()
    assert isinstance(model.body.drop, nn.Dropout) and model.body.drop.p == 0.5
    assert model.body.fc1.in_features == 64 * 4 * 4


def test_find_head_returns_the_final_layer():
    model = make("preact_resnet18")
    assert find_head(model) is model.head

    class Wrapper(nn.Module):  # DDP stores the model as `.module`
        def __init__(self, module):
            super().__init__()
            self.module = module

    assert find_head(Wrapper(model)) is model.head
    assert find_head(torch.compile(Wrapper(model))) is model.head  # torch.compile keeps it as `._orig_mod`
    sequential = nn.Sequential(nn.Flatten(), nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    assert find_head(sequential) is sequential[3]
    with pytest.raises(ValueError, match="no nn.Linear"):
        find_head(nn.Sequential(nn.Conv2d(3, 8, 3)))


class Tagged(nn.Module):
    """Stand-in for a conditioning layer (e.g. dual BN + FiLM) that wraps the module it replaces."""

    def __init__(self, name, inner):
        super().__init__()
        self.name, self.inner = name, inner

    def forward(self, x):
        return self.inner(x)


def test_replace_modules_swaps_every_batchnorm_in_preact_resnet18():
    model = make("preact_resnet18")
    bn_names = [name for name, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(bn_names) == 17  # two per PreActBlock, eight blocks, plus the final BN

    count = replace_modules(model, lambda _, m: isinstance(m, nn.BatchNorm2d), Tagged)

    assert count == 17
    tagged = [(name, m) for name, m in model.named_modules() if isinstance(m, Tagged)]
    assert [name for name, _ in tagged] == bn_names and all(m.name == name for name, m in tagged)
    # The only BatchNorm2d left are the originals, now inside their replacements.
    assert [name for name, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)] == [
        f"{name}.inner" for name in bn_names
    ]
    assert model.eval()(images(2, CIFAR_SHAPE)).shape == (2, 10)


def test_replace_modules_reaches_nested_containers_and_keeps_sharing():
    shared = nn.ReLU()
    model = nn.Sequential(nn.ModuleList([nn.ReLU(), nn.Sequential(nn.Linear(2, 2), shared)]), shared)
    seen = []

    def factory(name, _):
        seen.append(name)
        return nn.Identity()

    count = replace_modules(model, lambda _, m: isinstance(m, nn.ReLU), factory)
    assert count == 2 and seen == ["0.0", "0.1.1"]
    assert isinstance(model[0][0], nn.Identity)
    assert model[0][1][1] is model[1] and isinstance(model[1], nn.Identity)


def test_replace_modules_does_not_descend_into_a_replaced_module():
    model = nn.Sequential(nn.Sequential(nn.Linear(2, 2)), nn.Linear(2, 2))
    count = replace_modules(model, lambda name, _: name.startswith("0"), lambda *_: nn.Identity())
    assert count == 1 and isinstance(model[0], nn.Identity) and isinstance(model[1], nn.Linear)


@pytest.mark.parametrize(
    ("name", "options", "mentions"),
    [
        ("resnet19", {}, ["'resnet19'", "madry_cnn", "resnet18", "wrn34_10"]),
        ("mnist_net", {"depth": 28}, ["'mnist_net'", "depth=28", "none"]),
        ("preact_resnet18", {"widen_factor": 2}, ["widen_factor=2", "depth"]),
        ("resnet18", {"dropout": 0.3}, ["dropout=0.3", "depth"]),
        ("trades_smallcnn", {"dropout": 0.3}, ["dropout=0.3"]),
        ("wrn34_10", {"depth": 30}, ["30", "28", "34"]),
        ("resnet18", {"depth": 20}, ["20", "18, 34, 50"]),
        ("preact_resnet18", {"depth": 50}, ["50", "18, 34"]),
    ],
)
def test_bad_names_and_options_raise_value_error_naming_them(name, options, mentions):
    with pytest.raises(ValueError) as error:
        build_model(name, num_classes=10, in_shape=CIFAR_SHAPE, mean=CIFAR_MEAN, std=CIFAR_STD, **options)
    for text in mentions:
        assert text in str(error.value)


def test_bad_mean_length_and_too_small_input_raise_value_error():
    with pytest.raises(ValueError, match="mean has 2 values; valid: 1 or 3"):
        build_model("resnet18", num_classes=10, in_shape=CIFAR_SHAPE, mean=(0.5, 0.5), std=(0.2,))
    with pytest.raises(ValueError, match=r"trades_smallcnn cannot take inputs of shape \(1, 8, 8\)"):
        make("trades_smallcnn", (1, 8, 8))
