"""RRM, robust representation matching (Vaishnavi, Eykholt & Rahmati, USENIX Security 2022, arXiv 2202.09994; code
github Ethos-lab/robust-representation-matching): a student of any architecture learns a frozen, adversarially
trained teacher's penultimate features on CLEAN inputs, with no attack during its training.

Per batch (clean, augmented x):  logits, φ_s = student(x, features=True);  φ_t = teacher(x, features=True) (frozen);
    loss = w_xent · CE(logits, y) + w_feat · d(P φ_s, φ_t)
with d the cosine distance 1 − cos (the authors maximise cos with weight −1: the same gradient) or the relative L2
distance ‖P φ_s − φ_t‖ / ‖φ_t‖ (their Restricted-ImageNet setting), and P a learned linear projection where the
feature sizes differ, else the identity. As in the authors' CIFAR ResNet-50 (a 2048 → 512 layer before its
classifier), P is a layer of the student: the classifier reads the matched features P φ_s (head_on_projection,
the default). head_on_projection=false keeps P to the loss alone, the classifier on φ_s: the student may then
classify with directions P ignores, which the teacher never vouched for (docs/methods/rrm.md measures both).
P is part of the student (trained, in its checkpoint, through DDP); the teacher is never trained, never saved.

Cost: one pass for the student's update plus the teacher's forward (a third of a pass) per example.
"""
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from advtrain.errors import ConfigError
from advtrain.methods.base import Method, accuracy
from advtrain.schema import MethodConfig, choice


class FeatureProjection(nn.Module):
    """The student's penultimate features mapped to the teacher's size."""

    def __init__(self, student_dim: int, teacher_dim: int):
        super().__init__()
        self.linear = nn.Linear(student_dim, teacher_dim)

    def forward(self, features):
        return self.linear(features)


class RRM(Method):
    @dataclass
    class Config(MethodConfig):
        teacher: Optional[str] = None  # an advtrain checkpoint (any method; required); its architecture comes from it
        feature_loss: str = choice("cosine", "rel_l2")
        w_feat: float = 1.0           # weight of the feature distance
        w_xent: float = 0.005         # weight of the student's cross-entropy (the authors' CIFAR-10 L-inf value)
        projection: str = choice("auto", "linear", "none")  # auto: a linear projection where the sizes differ
        head_on_projection: bool = True  # the classifier reads P φ_s (the authors' layout); false: P for the loss only

    def __init__(self, cfg, info):
        super().__init__(cfg, info)
        if not cfg.teacher:
            raise ConfigError("method=rrm needs method.teacher=<the checkpoint of a robust advtrain run>, e.g. "
                              "outputs/.../checkpoints/last.pt of a method=pgd run")
        self.features = True  # what the update's forward returns as features (projected, once wrap_model adds one)

    def companions(self):
        return {"teacher": self.cfg.teacher}

    def wrap_model(self, model, companions):
        student, teacher = model.feature_dim, companions["teacher"].feature_dim
        wanted = self.cfg.projection == "linear" or (self.cfg.projection == "auto" and student != teacher)
        if self.cfg.projection == "none" and student != teacher:
            raise ConfigError(f"method.projection=none, but the student's features have {student} values and the "
                              f"teacher's {teacher}: use method.projection=auto")
        if wanted and self.cfg.head_on_projection:
            # The projection becomes the body's last layer and a new classifier reads its output, so the
            # penultimate features (features=True) are the matched ones.
            model.body = nn.Sequential(model.body, FeatureProjection(student, teacher))
            model.head = nn.Linear(teacher, model.num_classes)
        elif wanted:
            model.rrm_projection = FeatureProjection(student, teacher)
        # What the update's forward returns as features: projected (inside that forward) where there is a projection.
        self.features = "rrm_projection" if wanted and not self.cfg.head_on_projection else True
        return model

    def train_step(self, batch, ctx):
        c, x, y = self.cfg, batch.x, batch.y
        logits, features = ctx.model(x, features=self.features)
        with torch.no_grad():
            _, target = ctx.companions["teacher"](x, features=True)
        features, target = features.float(), target.float()
        if c.feature_loss == "cosine":
            distance = 1 - F.cosine_similarity(features, target, dim=1, eps=1e-6)
        else:
            distance = (features - target).norm(dim=1) / target.norm(dim=1).clamp_min(1e-12)
        loss = c.w_xent * F.cross_entropy(logits, y) + c.w_feat * distance.mean()
        ctx.update(loss)
        ctx.counter.add(len(y), 1.0 + 1 / 3)  # the student's pass, and the teacher's forward
        return {"loss": loss.detach(), "acc": accuracy(logits, y), "feature_distance": distance.mean().detach()}

