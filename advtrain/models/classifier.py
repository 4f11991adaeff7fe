"""The wrapper every architecture lives in, and the helpers that look inside it.

Attacks perturb images in [0,1] pixel space, so eps and the clamp to the valid image box mean what they say only if
the model takes raw pixels. `Classifier` therefore owns its input normalization; the split into `body` (normalized
image -> penultimate features) and `head` (the final Linear) is what feature-level losses and head re-initialization
need.

One forward serves every method, through DDP and torch.compile alike:

    logits = model(x)
    logits, features = model(x, features=True)      # the penultimate features of the same forward (RRM, RAT)
    logits = model(x, cond=lam)                     # a conditioned model (OAT's per-example lambda)

A condition reaches the building blocks that read it (`Conditional` modules a method put in with `replace_modules`)
for the length of one forward. `bind(model, cond)` fixes it, giving the plain x -> logits module that attacks,
evaluation views and external attack libraries take.
"""

from collections.abc import Callable, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn


class Conditional(nn.Module):
    """A building block that reads the condition of the current forward (`self.condition`: per-example, or None
    when the model runs unconditioned). Classifier sets it; the block must not keep it."""

    condition: Any = None


class Normalize(nn.Module):
    """(x - mean) / std per channel. Buffers, not constants, so they follow `.to()`, DDP and the state_dict."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        mean, std = torch.tensor([float(m) for m in mean]), torch.tensor([float(s) for s in std])
        if mean.numel() != std.numel():
            raise ValueError(f"mean has {mean.numel()} values but std has {std.numel()}")
        if (std <= 0).any():
            raise ValueError(f"std must be positive, got {std.tolist()}")
        self.register_buffer("mean", mean.view(1, -1, 1, 1))
        self.register_buffer("std", std.view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std

    def extra_repr(self) -> str:
        def show(values):
            return "(" + ", ".join(f"{v:.4g}" for v in values.flatten().tolist()) + ")"

        return f"mean={show(self.mean)}, std={show(self.std)}"


class Classifier(nn.Module):
    """logits = head(body(normalize(x))) for x in [0,1]."""

    def __init__(self, normalize: Normalize, body: nn.Module, head: nn.Linear, arch: str):
        super().__init__()
        self.normalize = normalize
        self.body = body
        self.head = head
        self.arch = arch

    # Read from the head so they stay true if a method swaps the head (e.g. for a different label set).
    @property
    def feature_dim(self) -> int:
        return self.head.in_features

    @property
    def num_classes(self) -> int:
        return self.head.out_features

    def features(self, x: torch.Tensor, cond: Any = None) -> torch.Tensor:
        with self._conditioned(cond):
            return self.body(self.normalize(x))

    def extra_repr(self) -> str:
        return f"arch={self.arch!r}"

    def forward(self, x: torch.Tensor, *, cond: Any = None, features: bool | str = False):
        """logits, or (logits, penultimate features) with features=True; features="<name>" passes them through
        that submodule of the classifier first (a method's own projection, put in by its wrap_model), inside this
        one forward, so DDP reduces its gradient too. `cond` conditions the forward."""
        feats = self.features(x, cond)
        logits = self.head(feats)
        if not features:
            return logits
        return logits, (feats if features is True else getattr(self, features)(feats))

    @contextmanager
    def _conditioned(self, cond: Any):
        blocks = [m for m in self.body.modules() if isinstance(m, Conditional)] if cond is not None else ()
        for block in blocks:
            block.condition = cond
        try:
            yield
        finally:
            for block in blocks:
                block.condition = None


class Bound(nn.Module):
    """A conditioned model fixed to one condition: x -> logits, as attacks and attack libraries expect. A number (or
    an object with `for_batch(n, device)`) is broadcast to every example of whatever batch comes (AutoAttack sends
    sub-batches); a per-example tensor must match the batch."""

    def __init__(self, model: nn.Module, cond: Any):
        super().__init__()
        self.model, self.cond = model, cond

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cond = self.cond
        if hasattr(cond, "for_batch"):  # a condition that knows how to fill a batch (OAT's FixedLambda)
            cond = cond.for_batch(len(x), x.device)
        elif isinstance(cond, (int, float)):
            cond = torch.full((len(x),), float(cond), device=x.device)
        elif torch.is_tensor(cond) and cond.ndim > 0 and len(cond) != len(x):
            raise ValueError(f"a condition for {len(cond)} examples cannot condition a batch of {len(x)}")
        return self.model(x, cond=cond)


def bind(model: nn.Module, cond: Any) -> nn.Module:
    """`model` with its condition fixed (the model itself where `cond` is None)."""
    return model if cond is None else Bound(model, cond)


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside DDP/DataParallel (`.module`) and torch.compile (`._orig_mod`) wrappers, in any nesting."""
    while True:
        inner = getattr(model, "_orig_mod", None)
        if inner is None:
            inner = getattr(model, "module", None)
        if not isinstance(inner, nn.Module):
            return model
        model = inner


def find_head(model: nn.Module) -> nn.Linear:
    """The final classification layer: `Classifier.head`, else the last nn.Linear registered."""
    model = unwrap(model)
    if isinstance(model, Classifier):
        return model.head
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError(f"{type(model).__name__} has no nn.Linear layer to use as the head")
    return linears[-1]


def replace_modules(
    model: nn.Module,
    predicate: Callable[[str, nn.Module], bool],
    factory: Callable[[str, nn.Module], nn.Module],
) -> int:
    """Swap, in place, every submodule for which predicate(qualified_name, module) holds with factory(name, module).

    Lets a method change a building block everywhere (e.g. BatchNorm2d -> dual BN with FiLM) without editing
    architecture files. The model itself is never replaced. Once a module is replaced its children are not visited,
    and a module registered in several places gets one replacement, so weight sharing survives. Returns how many
    distinct modules were replaced.
    """
    replaced_prefixes: list[str] = []
    replacements: dict[int, nn.Module] = {}
    for name, module in list(model.named_modules(remove_duplicate=False)):
        if not name or any(name.startswith(prefix + ".") for prefix in replaced_prefixes):
            continue
        if id(module) not in replacements:
            if not predicate(name, module):
                continue
            replacements[id(module)] = factory(name, module)
        parent_name, _, child_name = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child_name, replacements[id(module)])
        replaced_prefixes.append(name)
    return len(replacements)


def count_parameters(model: nn.Module) -> int:
    """All parameters, trainable or not, each shared tensor once (the figure papers report)."""
    return sum(p.numel() for p in model.parameters())
