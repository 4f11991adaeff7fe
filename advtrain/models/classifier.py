"""The wrapper every architecture lives in, and the helpers that look inside it.

Attacks perturb images in [0,1] pixel space, so eps and the clamp to the valid image box mean what they say only if
the model takes raw pixels. `Classifier` therefore owns its input normalization; the split into `body` (normalized
image -> penultimate features) and `head` (the final Linear) is what feature-level losses and head re-initialization
need.
"""

from collections.abc import Callable, Sequence

import torch
from torch import nn


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

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(self.normalize(x))

    def extra_repr(self) -> str:
        return f"arch={self.arch!r}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


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
