"""The contract test method: one method that uses every part of the plug-in contract, kept outside the package as a
user's own method would be (conf/method/contract.yaml names it with _target_).

- a conditioned model: wrap_model adds a `Conditional` block (features scaled by 1 + condition * gain, the shape of
  OAT's FiLM); half of each batch trains at condition 0, half at 1, and the attack runs on the bound model;
- features from the update's own forward: ctx.model(x, cond=c, features=True);
- a frozen companion model: an advtrain checkpoint (`teacher`) whose features the student's are pulled towards;
- gradient accumulation: the batch's two halves are two backwards (the first without DDP's all-reduce), one step;
- two evaluation views (condition 0 and 1), and model selection on the second view's first attack.
"""
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from omegaconf import MISSING
from torch import nn

from advtrain.attacks import pgd
from advtrain.methods import Method
from advtrain.methods.base import View
from advtrain.models import Conditional, bind
from advtrain.schema import MethodConfig, pixel


class ConditionalGain(Conditional):
    def __init__(self, dim: int):
        super().__init__()
        self.gain = nn.Parameter(torch.zeros(dim))

    def forward(self, features):
        if self.condition is None:
            return features
        return features * (1 + self.condition.to(features.dtype).view(-1, 1) * self.gain)


class Contract(Method):
    @dataclass
    class Config(MethodConfig):
        eps: Any = pixel()
        alpha: Any = pixel()
        teacher: str = MISSING
        feature_weight: float = 0.5

    def companions(self):
        return {"teacher": self.cfg.teacher}

    def wrap_model(self, model, companions):
        model.body = nn.Sequential(model.body, ConditionalGain(model.feature_dim))
        return model

    def train_step(self, batch, ctx):
        c, t, x, y = self.cfg, self.threat, batch.x, batch.y
        cond = (torch.arange(len(y), device=y.device) % 2).float()
        x_adv = pgd(bind(ctx.attack_model, cond), x, y, eps=t.eps, alpha=t.alpha, steps=2, counter=ctx.counter)
        teacher = ctx.companions["teacher"]
        halves = [torch.arange(0, len(y) // 2, device=y.device), torch.arange(len(y) // 2, len(y), device=y.device)]
        total, correct = 0.0, 0.0
        for i, rows in enumerate(halves):
            logits, features = ctx.model(x_adv[rows], cond=cond[rows], features=True)
            with torch.no_grad():
                _, target = teacher(x[rows], features=True)
            loss = F.cross_entropy(logits, y[rows]) + c.feature_weight * (
                1 - F.cosine_similarity(features.float(), target.float(), dim=1)).mean()
            ctx.backward(loss * len(rows) / len(y), last=i == len(halves) - 1)
            total = total + loss.detach() * len(rows) / len(y)
            correct = correct + (logits.argmax(1) == y[rows]).float().sum().detach()
        ctx.step()
        ctx.counter.add(len(y), 1.0 + 1 / 3)  # the update's pass, and the teacher's forward (a third of a pass)
        return {"loss": total, "acc": correct / len(y)}

    def eval_views(self):
        return [View("plain", 0.0), View("shifted", 1.0)]

    def select_score(self, scores):
        shifted = scores["shifted"]
        return shifted[next((k for k in shifted if k not in ("n", "clean")), "clean")]
