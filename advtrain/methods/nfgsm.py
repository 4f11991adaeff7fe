"""N-FGSM, "Make Some Noise: Reliable and Efficient Single-Step Adversarial Training" (de Jorge et al., NeurIPS
2022, arXiv 2202.01181; code: github.com/pdejorge/N-FGSM).

Per batch: eta ~ U(-k eps, k eps) with k = 2; one input-gradient step delta = eta + alpha sign(grad) with
alpha = eps; NO projection back to the eps-ball; one update on CE(f(x + delta)). Cost: 2 passes per example.
Stronger noise and no clipping are what keep it free of catastrophic overfitting, so it needs no guard.

Each decision follows the authors' train.py: its main()'s batch loop, from `# Initialize random step` to the
training step, and the defaults of get_args() (`--alpha`, `--unif`, `--clip`, about lines 51-63). That code works in
normalized units with a per-channel eps; here everything is in [0, 1] pixel units, where its per-channel loop is one
draw with one eps:
- noise: `eta[:, j].uniform_(-args.unif * epsilon[j], args.unif * epsilon[j])`, then
  `eta = clamp(eta, lower_limit - X, upper_limit - X)`: uniform in [-k eps, k eps] per pixel, clamped so x + eta
  lies in [0, 1] (`--unif` default 2.0; 0 means no noise). random_init(..., 'uniform') draws exactly that.
- the step: `delta = eta + alpha * torch.sign(grad)` with grad = d CE(model(X + eta), y) / d eta: a sign step from
  the noisy point (`--alpha` default 8 = `--epsilon` default 8, and experiments.sh sets alpha = epsilon throughout:
  alpha = None here means eps).
- `delta = clamp(delta, lower_limit - X, upper_limit - X)`: x + delta stays in [0, 1].
- `if args.clip > 0: delta = clamp(delta, -clip, clip)` with clip = args.clip * epsilon; `--clip` defaults to -1, no
  clipping, so |delta| reaches (k + 1) eps. `clip` here is that multiple of eps; None (the default) never clips.
  (utils/attack_utils.py's attack_nfgsm clips whenever clip != 0, but train.py, what the paper trains with, does not
  call it.)
- BN mode: the model is put in train mode once (`model.train()`) and the attack's forward runs in it, so
  `bn` defaults to train (its running statistics see x + eta too, as in their code).
- the update is one CE on X + delta, as `cross_entropy_update` does.
The SVHN schedule of their code (eps, alpha and clip ramped from 0 over 5 epochs) is advtrain's trainer.eps_warmup:
eps and alpha are pixel() fields, read through self.threat, and k and clip are multiples of its eps, so all follow it.

Reused from the attack engine: the noise is random_init at radius k eps; the step is pgd(steps=1, init=x + eta) with
the ball radius set to k eps + alpha, which the step cannot leave, so pgd's projection only clamps to the image box.
"""
from dataclasses import dataclass
from typing import Any, Optional

from advtrain.attacks import pgd, project, random_init
from advtrain.methods.base import cross_entropy_update
from advtrain.methods.overfitting_guard import GuardConfig, GuardedMethod
from advtrain.schema import choice, in_range, pixel


class NFGSM(GuardedMethod):

    @dataclass
    class Config(GuardConfig):  # the guard: off by default, as the authors need none
        eps: Any = pixel("${dataset.eps}")
        alpha: Any = pixel(None)     # the step; None = eps, as the authors (--alpha = --epsilon)
        k: float = in_range(0, None, 2.0, what="the noise magnitude, a multiple of eps (0: no noise)")  # --unif
        # clip delta to [-clip eps, clip eps] after the step (their --clip); None: never (their default, -1)
        clip: Optional[float] = in_range(0, None, None, what="the clipping radius, a multiple of eps")
        bn: str = choice("train", "eval", "keep")  # train: their attack's forward runs in train mode

    def train_step(self, batch, ctx):
        c, eps = self.cfg, self.threat.eps
        x, y = batch.x, batch.y
        alpha = eps if self.threat.alpha is None else self.threat.alpha
        noise = c.k * eps
        start = random_init(x, noise, "linf", "uniform")  # x + U(-k eps, k eps), clamped to [0, 1]
        # A radius of k eps + alpha: |eta + alpha sign(g)| never exceeds it, so nothing is projected to a ball.
        x_adv = pgd(ctx.attack_model, x, y, eps=noise + alpha, alpha=alpha, steps=1, init=start, bn=c.bn,
                    counter=ctx.counter)
        if c.clip is not None:
            x_adv = project(x_adv, x, c.clip * eps, "linf")
        return cross_entropy_update(ctx, x_adv, y)
