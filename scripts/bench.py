#!/usr/bin/env python
"""Training throughput of advtrain's fast path, side by side with a loop written the way the papers' code trains.

    python scripts/bench.py method=pgd arch=mnist_net dataset.shape=[1,28,28] dataset.num_classes=10
    python scripts/bench.py --ablate method=pgd arch=preact_resnet18 dataset.shape=[3,32,32] trainer.batch_size=512
    python scripts/bench.py --json bench.json dataset=mnist dataset.root=../shared/data arch=mnist_net
    python scripts/bench.py --row "pgd-10: method=pgd method.steps=10" --row "natural: method=natural" arch=mnist_net

Positional arguments are advtrain config overrides, exactly as `advtrain` takes them (dataset=synthetic, logger=none
and no evaluation attacks unless overridden; synthetic data is sized to the steps measured). Every row is measured
in this one process, on the same data and the same initial weights, the rows taking turns in timed windows (the
median window counts), so compare rows within a run: the ratios are the result, the absolute numbers belong to this
machine and its load.

Rows: `fast path` is what `advtrain` runs with these overrides; `reference` is scripts/bench_reference.py (the
papers' way); with --ablate, each further row switches ONE fast-path feature (to its opposite) and reports its
throughput relative to the fast path. With --row, the rows are instead the given configurations (e.g. one per
method), each relative to the first, and there is no reference row. Per row: training images/s, passes per example (advtrain's cost accounting),
the share of step time in attack and in update, peak device memory, and the matrix FLOP/s achieved (FLOPs counted by
torch.utils.flop_counter on one step) against the matmul rate measured on this device at the run's precision.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

# Inductor compiles in a pool of worker processes that start in the background and would steal the CPU from the
# windows timed meanwhile; compile time is not what is measured here.
os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")

import torch  # noqa: E402
from torch import nn  # noqa: E402

import advtrain  # noqa: E402
from advtrain.attacks import PassCounter  # noqa: E402
from advtrain.attacks import projected as attack_engine  # noqa: E402
from advtrain.config import check_config  # noqa: E402
from advtrain.data import Batch  # noqa: E402
from advtrain.engine.loop import LoopSettings, train_batch  # noqa: E402
from advtrain.engine.optim import resolve_impl  # noqa: E402
from advtrain.engine.precision import resolve_runtime, seed_everything  # noqa: E402
from advtrain.engine.run import build_context, build_parts  # noqa: E402
from advtrain.errors import UserError  # noqa: E402
from advtrain.hydra_errors import describe_hydra_error  # noqa: E402
from advtrain.schema import TRAIN_SECTIONS  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_measure import (Marks, MatrixFlops, Row, Runner, allocated, count_syncs,  # noqa: E402
                           matrix_rate)
from bench_reference import REFERENCE, NoReference, Reference, run_loader  # noqa: E402

DEFAULTS = ["dataset=synthetic", "logger=none", "attack=[]"]


@dataclass
class Variant:
    """One way of running advtrain's step: config overrides plus the switches that are not config."""
    name: str
    overrides: list = field(default_factory=list)
    weight_grads: bool = False       # attack steps backpropagate into the weights (loss.backward())
    sync_every_step: bool = False    # read the loss on the host after every step (.item())
    cudnn_benchmark: bool = True     # cuDNN autotuning (CUDA)
    host_data: bool = False          # batches from a DataLoader with per-image CPU transforms, copied to the device


def compose(overrides: list[str]):
    from hydra import compose as hydra_compose, initialize_config_module

    from advtrain.sweep import register_resolvers

    register_resolvers()
    with initialize_config_module("advtrain.conf", version_base="1.3"):
        return check_config(hydra_compose("train", overrides=overrides), TRAIN_SECTIONS)


def sized(overrides: list[str], batches: int) -> list[str]:
    """Synthetic data just large enough for `batches` full batches of one epoch (no epoch boundary inside)."""
    cfg = compose(overrides)
    if cfg.dataset.name != "synthetic" or any(o.startswith("dataset.n_train=") for o in overrides):
        return overrides
    return [*overrides, f"dataset.n_train={cfg.trainer.batch_size * batches}"]


class _MarkForward(nn.Module):
    def __init__(self, inner: nn.Module, marks: Marks):
        super().__init__()
        self.inner, self.marks = inner, marks

    def forward(self, *args, **kwargs):
        self.marks.mark("update_forward")
        return self.inner(*args, **kwargs)


def instrument(ctx, marks: Marks) -> None:
    """Mark where each update's forward starts and where its backward, and the optimizer step, end: ctx.update is
    backward + step, and a method that accumulates (OATS: a backward per width, one step) calls them itself."""
    ctx.model = _MarkForward(ctx.model, marks)
    plain_backward, plain_step = ctx.backward, ctx.step

    def backward(*args, **kwargs):
        grads = plain_backward(*args, **kwargs)
        marks.mark("update_end")
        return grads

    def step():
        marks.mark("update_forward")  # the step is update time too
        plain_step()
        marks.mark("update_end")

    ctx.backward, ctx.step = backward, step


@contextmanager
def attack_grads_into_weights(enabled: bool):
    """The papers' attack step: loss.backward() computes every weight gradient too, then reads the input's."""
    if not enabled:
        yield
        return

    def through_weights(loss, x):
        loss.backward()
        return x.grad

    plain = attack_engine.input_gradient
    attack_engine.input_gradient = through_weights
    try:
        yield
    finally:
        attack_engine.input_gradient = plain


def device_batches(loader):
    """Full training batches, epoch after epoch."""
    epoch = 0
    while True:
        for batch in loader.epoch(epoch):
            if len(batch.y) == loader.batch_size:
                yield batch
        epoch += 1


def host_batches(cfg, data, device, workers: int):
    """The DataLoader the reference uses, feeding advtrain's step."""
    loader = run_loader(cfg, data, device, workers)
    while True:
        for x, y in loader:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            yield Batch(x, y, torch.zeros_like(y), None, None)


class Ours(Runner):
    """advtrain's own step (engine.loop.train_batch) on the run's parts, instrumented to split attack from update."""

    def __init__(self, variant: Variant, base: list[str], workers: int):
        self.variant = variant
        self.cfg = cfg = compose(base + variant.overrides)
        self.loop = LoopSettings.of(cfg)
        self.rt = rt = resolve_runtime(cfg.trainer)
        super().__init__(variant.name, rt.device, cfg.trainer.batch_size)
        seed_everything(cfg.seed, cfg.trainer.deterministic)  # every runner starts from the same weights and data
        self.parts = build_parts(cfg, rt)
        self.counter = PassCounter()
        self.ctx = build_context(cfg, self.parts, self.counter)
        self.marks = Marks(rt.device)
        instrument(self.ctx, self.marks)
        self.parts.method.setup(self.ctx)
        self.batches = (host_batches(cfg, self.parts.data, rt.device, workers) if variant.host_data
                        else device_batches(self.parts.data.train))
        self.sums: dict = {}
        self.timed_steps = 0

    @contextmanager
    def settings(self):
        torch.backends.cudnn.benchmark = self.variant.cudnn_benchmark and not self.cfg.trainer.deterministic
        with attack_grads_into_weights(self.variant.weight_grads):
            yield

    def step(self) -> None:
        self.marks.mark("step")
        ctx = self.ctx
        ctx.batch_idx = (ctx.batch_idx + 1) % ctx.batches_per_epoch
        train_batch(ctx, self.parts.method, next(self.batches), self.loop, self.sums)
        if self.variant.sync_every_step:
            float(self.sums["loss"])

    def begin(self) -> None:
        self.counter.reset()
        self.marks.items.clear()

    def end_window(self) -> None:
        self.marks.mark("step_end")

    def row(self, steps: int) -> Row:
        row = super().row(steps)
        attack, update = self.marks.split()
        row.attack_share, row.update_share = attack / (attack + update), update / (attack + update)
        row.passes_per_example = self.counter.total / (steps * len(self.seconds) * self.batch_size)
        with self.settings():
            row.host_syncs_per_step = count_syncs(self.step, self.device)
        return row


def count_flops(cfg, parts) -> float:
    """Matmul/conv FLOPs of one eager training step per image (the work, whatever the kernels)."""
    counter = PassCounter()
    ctx = build_context(cfg, parts, counter)
    ctx.model = ctx.attack_model = parts.model  # eager: the counter cannot see inside compiled graphs
    parts.method.setup(ctx)
    batch = next(device_batches(parts.data.train))
    with MatrixFlops() as flops:
        train_batch(ctx, parts.method, batch, LoopSettings.of(cfg), {})
    return flops.total / len(batch.y)


def ablations(cfg, rt) -> list[Variant]:
    """Each fast-path feature switched to its opposite, one at a time."""
    cuda = rt.device.type == "cuda"
    other_precision = "fp32" if rt.precision != "fp32" else ("bf16" if cuda or _cpu_bf16() else None)
    variants = [Variant(f"precision {other_precision}", [f"trainer.precision={other_precision}"])] \
        if other_precision else []
    variants += [
        Variant(f"channels_last {'off' if rt.channels_last else 'on'}",
                [f"trainer.channels_last={str(not rt.channels_last).lower()}"]),
        Variant("attack grads into weights", weight_grads=True),
        *[Variant(f"optimizer {impl}", [f"optim.impl={impl}"]) for impl in ("loop", "foreach", "fused")
          if impl != resolve_impl(cfg.optim.impl)],
        Variant("loss .item() every step", sync_every_step=True),
        Variant("host DataLoader, per-image transforms", host_data=True),
    ]
    if cuda:
        variants.append(Variant("cudnn autotune off", cudnn_benchmark=False))
    if not cfg.trainer.compile:
        variants.append(Variant("torch.compile", ["trainer.compile=true"]))
        if cuda:
            variants.append(Variant("torch.compile + CUDA graphs",
                                    ["trainer.compile=true", "trainer.compile_mode=reduce-overhead"]))
    variants.append(Variant("fast path, measured again"))  # how far two measurements of one thing differ here
    return variants


def _cpu_bf16() -> bool:
    return bool(getattr(torch.backends, "mkldnn", None)) and torch.backends.mkldnn.is_available()


def fmt(value, spec: str, none: str = "-") -> str:
    return none if value is None else format(value, spec)


def print_table(rows: list[Row], header: str) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=header, title_justify="left")
    for name in ("variant", "img/s", "± spread", "× fast path", "passes/ex", "attack | update", "peak MiB",
                 "TFLOP/s", "of matmul rate", "syncs/step"):
        table.add_column(name, justify="left" if name == "variant" else "right")
    for r in rows:
        if r.error:
            table.add_row(r.name, f"failed: {r.error}", *[""] * 8)
            continue
        split = f"{r.attack_share:.0%} | {r.update_share:.0%}" if r.attack_share is not None else "-"
        table.add_row(r.name, fmt(r.images_per_s, ".1f"), fmt(r.spread, ".0%"), fmt(r.vs_fast_path, ".2f"),
                      fmt(r.passes_per_example, ".2f"),
                      split, fmt(r.peak_memory_mib, ".0f"), fmt(r.matrix_tflops, ".3g"),
                      fmt(r.of_matrix_rate, ".1%"), fmt(r.host_syncs_per_step, ".1f"))
    Console(width=140).print(table)


def _row(text: str) -> Variant:
    label, sep, overrides = text.partition(":")
    if not sep or not label.strip():
        raise argparse.ArgumentTypeError(f"{text!r}: expected 'LABEL: override override ...'")
    return Variant(label.strip(), overrides.split())


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], epilog="overrides: advtrain config overrides")
    parser.add_argument("--steps", type=int, default=20, help="timed training steps per row (default 20)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps before each row (default 3)")
    parser.add_argument("--repeats", type=int, default=3,
                        help="timed windows of --steps steps per row; the row shows their median (default 3)")
    parser.add_argument("--ablate", action="store_true", help="also measure each fast-path feature switched off/on")
    parser.add_argument("--no-reference", dest="reference", action="store_false", help="skip the papers' loop")
    parser.add_argument("--skip", action="append", default=[], metavar="TEXT",
                        help="leave out the --ablate rows whose name contains TEXT (repeatable), e.g. compile")
    parser.add_argument("--only", action="append", default=[], metavar="TEXT",
                        help="keep only the --ablate rows whose name contains TEXT (repeatable), e.g. compile")
    parser.add_argument("--row", action="append", default=[], type=_row, metavar="'LABEL: OVERRIDES'",
                        help="measure this configuration as a row of its own (repeatable); the first is the "
                             "baseline, e.g. --row 'pgd-10: method=pgd method.steps=10' --row 'natural: "
                             "method=natural'. The positional overrides apply to every row")
    parser.add_argument("--workers", type=int, default=None,
                        help="DataLoader workers of the reference (default as the papers' code: 2 for colour "
                             "images (CIFAR scripts), 0 for grayscale (MNIST scripts))")
    parser.add_argument("--json", type=Path, help="also write the results here")
    opts, overrides = parser.parse_known_args(argv)
    bad = [o for o in overrides if o.startswith("-")]
    if bad:
        parser.error(f"unknown option {bad[0]}")
    if opts.row:
        opts.reference = False  # the reference loop is one method's; rows compare configurations with each other
    try:
        result = bench(opts, overrides)
    except Exception as e:  # config, data and checkpoint errors: one line, as advtrain prints them
        message = str(e) if isinstance(e, UserError) else describe_hydra_error(e)
        if message is None:
            raise
        print(f"bench: error: {message}", file=sys.stderr)
        return 2
    if opts.json:
        opts.json.write_text(json.dumps({"command": " ".join(["python scripts/bench.py", *argv]), **result},
                                        indent=2) + "\n")
    return 0


def bench(opts, overrides: list[str]) -> dict:
    base = sized(DEFAULTS + overrides, opts.warmup + opts.steps * opts.repeats + 4)
    before = allocated(torch.device("cuda")) if torch.cuda.is_available() else 0
    first, *others = getattr(opts, "row", None) or [Variant("fast path (advtrain)")]
    fast = Ours(first, base, opts.workers)
    fast.warm_up(opts.warmup, before)
    cfg, rt, parts = fast.cfg, fast.rt, fast.parts
    if opts.workers is None:
        opts.workers = 0 if parts.data.info.shape[0] == 1 else 2
    makers = [(REFERENCE, lambda: Reference(fast, opts.workers))] if opts.reference else []
    variants = others + [v for v in (ablations(cfg, rt) if opts.ablate else [])
                         if not any(t in v.name for t in opts.skip)
                         and (not getattr(opts, "only", None) or any(t in v.name for t in opts.only))]
    makers += [(v.name, lambda v=v: Ours(v, base, opts.workers)) for v in variants]
    runners: list[Runner] = [fast]
    failed: list[Row] = []
    for name, make in makers:
        before = allocated(rt.device)
        try:
            runner = make()
            runner.warm_up(opts.warmup, before)
            runners.append(runner)
        except NoReference as e:
            print(f"bench: {e}", file=sys.stderr)
        except Exception as e:  # e.g. torch.compile without a working compiler: report it, measure the rest
            failed.append(Row(name, error=f"{type(e).__name__}: {str(e).splitlines()[0][:80]}"))
    for runner in runners:  # one more untimed round, now that everything is built
        with runner.settings():
            for _ in range(opts.warmup):
                runner.step()
        runner.begin()
    for _ in range(opts.repeats):
        for runner in runners:
            runner.window(opts.steps)
    rows = [runner.row(opts.steps) for runner in runners] + failed
    dtype = torch.bfloat16 if rt.precision == "bf16" else torch.float16 if rt.precision == "fp16" else torch.float32
    rate = matrix_rate(rt.device, dtype)
    # FLOPs per image: the same for every variant of one configuration, counted again for each --row.
    flops = {id(fast): count_flops(cfg, parts)}
    for runner, r in zip(runners, rows):
        if isinstance(runner, Ours) and runner is not fast and runner.variant in others:
            flops[id(runner)] = count_flops(runner.cfg, runner.parts)
        r.flops_per_image = flops.get(id(runner), flops[id(fast)])
    flops_per_image = flops[id(fast)]
    for r in rows:
        if r.images_per_s is not None:
            r.vs_fast_path = r.images_per_s / rows[0].images_per_s
            r.matrix_tflops = r.flops_per_image * r.images_per_s / 1e12
            r.of_matrix_rate = r.matrix_tflops * 1e12 / rate
    reference = next((r for r in rows if r.name == REFERENCE and r.images_per_s), None)
    result = {
        "overrides": base, "method": cfg.method.name, "arch": cfg.arch.name, "shape": list(parts.data.info.shape),
        "batch_size": cfg.trainer.batch_size, "steps": opts.steps, "repeats": opts.repeats,
        "warmup": opts.warmup,
        "reference_workers": opts.workers if opts.reference else None,
        "device": torch.cuda.get_device_name(rt.device) if rt.device.type == "cuda" else platform.processor() or "cpu",
        "cpu_threads": torch.get_num_threads(), "precision": rt.precision, "channels_last": rt.channels_last,
        "torch": torch.__version__, "advtrain": advtrain.__version__,
        "matrix_rate_tflops": rate / 1e12, "matrix_dtype": str(dtype).removeprefix("torch."),
        "flops_per_image": flops_per_image,
        "speedup_vs_reference": rows[0].images_per_s / reference.images_per_s if reference else None,
        "rows": [asdict(r) for r in rows],
    }
    header = (f"{cfg.method.name} · {cfg.arch.name} · {'×'.join(map(str, parts.data.info.shape))} · batch "
              f"{cfg.trainer.batch_size} · {result['device']} · {rt.precision} · {opts.repeats}×{opts.steps} steps; matmul rate "
              f"{rate / 1e12:.3g} TFLOP/s ({result['matrix_dtype']}); {flops_per_image / 1e9:.3g} GFLOP/image")
    print_table(rows, header)
    if reference:
        print(f"advtrain / reference: {result['speedup_vs_reference']:.2f}× the images per second")
    return result


if __name__ == "__main__":
    sys.exit(main())
