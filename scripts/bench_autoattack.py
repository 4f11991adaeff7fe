"""What AutoAttack costs in advtrain, against the official pyautoattack called directly, on one checkpoint.

    python scripts/bench_autoattack.py outputs/.../checkpoints/last.pt --n 200 [--root DATA] [--repeats 2]

Both run the standard version (APGD-CE, APGD-T, FAB-T, Square) on the same first n test images of the checkpoint's
dataset, at its eps, in one process, alternating; it prints each one's robust accuracy (they must agree), its
seconds per 1000 images, and the ratio advtrain / official. advtrain's own work around the official code (its BN
mode, the forked RNG, the ball check, reading the per-attack accuracies) is what the ratio measures.
"""
from __future__ import annotations

import argparse
import time

import torch
from omegaconf import OmegaConf


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint")
    parser.add_argument("--n", type=int, default=200, help="test images attacked")
    parser.add_argument("--root", default=None, help="dataset.root (default: the checkpoint's)")
    parser.add_argument("--repeats", type=int, default=2, help="timed runs of each, alternating")
    args = parser.parse_args()

    from pyautoattack import AutoAttack

    from advtrain import load_model
    from advtrain.attacks.autoattack import AutoAttackEval
    from advtrain.data import build_data
    from advtrain.engine.checkpoint import Checkpoint

    saved = OmegaConf.create(Checkpoint.load(args.checkpoint).config)
    if args.root:
        saved.dataset.root = args.root
    data = build_data(saved.dataset, device=torch.device("cpu"), seed=0, batch_size=args.n)
    x, y = next(iter(data.test.batches(args.n, args.n)))
    model = load_model(args.checkpoint)
    eps = float(saved.dataset.eps)

    def ours() -> float:
        return AutoAttackEval(eps=eps, batch_size=args.n)(model, x, y).float().mean().item()

    def official() -> float:
        adversary = AutoAttack(model, norm="Linf", eps=eps, version="standard", device=x.device, seed=0)
        for targeted in (adversary.apgd_targeted, adversary.fab):  # fewer than 10 classes: as advtrain does
            targeted.n_target_classes = min(targeted.n_target_classes, data.info.num_classes - 1)
        _, y_adv = adversary.run_standard_evaluation(x, y, batch_size=args.n)
        return (y_adv == y).float().mean().item()

    times: dict[str, list[float]] = {"advtrain": [], "official": []}
    accuracy: dict[str, float] = {}
    for _ in range(args.repeats):
        for name, run in (("advtrain", ours), ("official", official)):
            start = time.perf_counter()
            accuracy[name] = run()
            times[name].append(time.perf_counter() - start)
    for name, seconds in times.items():
        best = min(seconds)
        print(f"{name:9s} robust accuracy {100 * accuracy[name]:.1f}%  {best:.1f} s for {args.n} images "
              f"({1000 * best / args.n:.0f} s per 1000; best of {len(seconds)})")
    print(f"advtrain / official: {min(times['advtrain']) / min(times['official']):.2f}")


if __name__ == "__main__":
    main()
