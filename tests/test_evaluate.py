"""The evaluation itself: seeded, so the same model gives the same numbers twice, and the caller's random stream
is left as it was."""
from __future__ import annotations

import torch
from torch import nn

from advtrain.data.loader import TensorEvalSet
from advtrain.engine.evaluate import evaluate

# A random start that decides the outcome: one tiny step from a start anywhere in a wide ball.
RANDOM_START = {"pgd": {"type": "pgd", "eps": 0.5, "alpha": 0.001, "steps": 1, "restarts": 1}}


def _setup():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
    images = torch.randint(0, 256, (512, 1, 4, 4), dtype=torch.uint8)
    labels = model(images.float() / 255).argmax(1)  # every example clean-correct: only the attack decides
    return model, TensorEvalSet(images, labels)


def test_the_same_seed_gives_the_same_numbers_and_leaves_the_callers_rng_alone():
    model, evalset = _setup()
    torch.manual_seed(123)
    before = torch.get_rng_state()
    first = evaluate(model, evalset, RANDOM_START, n=None, batch_size=128, seed=0)
    assert torch.equal(torch.get_rng_state(), before)
    torch.rand(1000)  # whatever the caller's stream did meanwhile does not matter
    assert evaluate(model, evalset, RANDOM_START, n=None, batch_size=128, seed=0) == first
    other = evaluate(model, evalset, RANDOM_START, n=None, batch_size=128, seed=1)
    assert other["pgd"] != first["pgd"] and other["clean"] == first["clean"] == 1.0
    assert 0.05 < first["pgd"] < 0.95  # the random start matters here, or the test could not fail
