"""MART (Wang et al., ICLR 2020, "Improving Adversarial Robustness Requires Revisiting Misclassified Examples").

Follows the authors' code (github YisenWang/MART), mart.py's `mart_loss`, called once per minibatch by
train_wideresnet.py / train_resnet.py:

- Attack (BN eval, their `model.eval()`; train mode again for the update): x' = x + init_std·N(0, I), init_std 0.001;
  `steps` times x' <- Proj(x' + alpha·sign(grad CE(f(x'), y))): PGD on cross-entropy with the labels, not TRADES' KL.
  Their defaults: epsilon 0.031, step_size 0.007, 10 steps; here eps/alpha/steps follow the dataset's threat model
  (CIFAR: 8/255, 2/255, 10, the paper's values that 0.031 and 0.007 round). advtrain's one PGD engine projects the
  start into [0, 1] before the first gradient; their code clamps only after each step (the two differ only at pixels
  within 0.001 of 0 or 1, for the first step).
- Loss (two forwards in train mode, f(x) then f(x'), as their code; DDP: one joint forward, see trades.py):
    BCE = CE(f(x'), y) + mean_i -log(1.0001 - max_{k != y} p(x')_k + 1e-12)        (their nll_loss on new_y)
    KL_i = sum_k p(x)_k (log p(x)_k - log(p(x')_k + 1e-12))   (nn.KLDivLoss(reduction='none') on log(adv_probs +
           1e-12) and nat_probs, summed over classes: KL(p(x) || p(x')), the clean distribution as target)
    loss = BCE + beta · (1 / n) sum_i KL_i · (1.0000001 - p(x)_y)                   (beta 6.0, their CIFAR-10 value)
  Their constants (1.0001, 1e-12, 1.0000001) and their log(softmax + 1e-12) are kept, so the loss equals theirs to
  float precision (tests/test_mart.py computes their lines beside it). max_{k != y} is their argsort's new_y: the
  top class, or the second when the top is y.
- Cost: steps attack passes + 2 (the update's clean and adversarial forward+backward); no clean-only forward, since
  the attack needs no p(x) (TRADES' + 1/3).
"""
from dataclasses import dataclass
from typing import Any

import torch
from torch.nn import functional as F

from advtrain.attacks import pgd
from advtrain.methods.base import accuracy
from advtrain.methods.trades import TRADES
from advtrain.schema import MethodConfig, attack_steps, choice, pixel


class MART(TRADES):
    """TRADES' setup and forward_pair (two forwards on one device, one joint forward under DDP), MART's attack and
    loss; no steps schedule (K is fixed)."""

    @dataclass
    class Config(MethodConfig):
        eps: Any = pixel("${dataset.eps}")
        alpha: Any = pixel("${dataset.pgd_alpha}")  # the attack step size
        steps: int = attack_steps("${dataset.pgd_steps}")
        beta: float = 6.0            # weight of the misclassification-aware KL term
        init_std: float = 0.001      # std of the Gaussian start, pixel units
        bn: str = choice("eval", "train", "keep")  # BN mode while attacking (their code: eval)
        forward: str = choice("auto", "separate", "joint")  # the update's forward(s), as TRADES'

    def train_step(self, batch, ctx):
        x_adv = self.adversarial(batch, ctx.attack_model, ctx.counter)
        logits_clean, logits_adv = self.forward_pair(ctx.model, batch.x, x_adv)
        bce, robust = mart_terms(logits_clean, logits_adv, batch.y)
        loss = bce + self.cfg.beta * robust
        ctx.update(loss)
        ctx.counter.add(len(batch.y), 2)
        # acc on x': the inputs MART's cross-entropy trains on
        return {"loss": loss.detach(), "acc": accuracy(logits_adv, batch.y), "bce": bce.detach(),
                "robust_kl": robust.detach()}

    def adversarial(self, batch, model, counter):
        """PGD on CE from x + init_std·N(0, I) (projected), on `model` with BN in `bn` mode; counts `steps` passes."""
        x = batch.x.detach()
        start = x + self.cfg.init_std * torch.randn_like(x)
        t = self.threat
        return pgd(model, x, batch.y, eps=t.eps, alpha=t.alpha, steps=self.steps, bn=self.cfg.bn, counter=counter,
                   loss="ce", init=start)


def mart_terms(logits_clean, logits_adv, y):
    """(BCE, misclassification-weighted KL batch mean): MART's two terms as the authors' mart.py computes them, in
    fp32; the loss is BCE + beta · KL."""
    logits_clean, logits_adv = logits_clean.float(), logits_adv.float()
    adv_probs = F.softmax(logits_adv, dim=1)
    nat_probs = F.softmax(logits_clean, dim=1)
    # the largest wrong-class probability: the true class's entry zeroed (probabilities are >= 0), then the max
    wrong = adv_probs.scatter(1, y[:, None], 0.0).amax(dim=1)
    bce = F.cross_entropy(logits_adv, y) - torch.log(1.0001 - wrong + 1e-12).mean()
    kl = F.kl_div(torch.log(adv_probs + 1e-12), nat_probs, reduction="none").sum(dim=1)
    true_probs = nat_probs.gather(1, y[:, None]).squeeze(1)
    robust = (kl * (1.0000001 - true_probs)).sum() / len(y)
    return bce, robust
