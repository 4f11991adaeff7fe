#!/usr/bin/env python
"""Every GPU measurement advtrain's docs rely on, in one command with a time cap per step.

    python scripts/gpu_check.py OUT               # on a GPU: at most --budget-s seconds (default 470)
    python scripts/gpu_check.py OUT --smoke       # every step at toy size on the CPU, in about a minute
    python scripts/gpu_check.py OUT --only e2e,profile

Runs from a plain checkout (the repo is put on PYTHONPATH for every step; `pip install -e .` is not needed, see
scripts/gpu_check.sh for a machine without the pure-Python dependencies). Each step is a separate process with its
own cap: a step that runs over is killed, reported as cut, and the next one starts. Writes OUT/gpu_check.json
(every number, each step's exact commands, torch/CUDA/driver versions, the GPU's name), OUT/gpu_check.md (the
tables, made by scripts/gpu_tables.py) and OUT/logs/ (each command's output), and prints the tables last.

The steps, most valuable first (compile rows last: a compile can take minutes, and is worth least if cut):
  ceilings   bf16/fp32 8192³ matmul TFLOP/s and device-to-device copy bandwidth
  pgd10      PreActResNet-18, CIFAR shape, batch 512, PGD-10: scripts/bench.py --ablate against the papers' loop
  wrn        WRN-34-10 at batch 128, PGD-10: img/s, share of the matmul rate, peak memory
  costs      every method side by side: img/s, passes per example, time per epoch relative to PGD-10
  e2e        python -m advtrain (trainer.devices=1) and torchrun --nproc_per_node=1 -m advtrain, each to a
             results.json with clean, PGD-20 and AutoAttack accuracy, checked
  profile    the top CUDA kernels of the pgd10 fast path (torch.profiler)
  compile    the pgd10 fast path against trainer.compile=true and compile_mode=reduce-overhead
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))
from gpu_tables import render  # noqa: E402

STEP_NAMES = ("ceilings", "pgd10", "wrn", "costs", "e2e", "profile", "compile")
TARGETS = {"of_matrix_rate": 0.40, "speedup_vs_reference": 5.0, "host_syncs_per_step": 0.0}

# CIFAR-shaped synthetic data with CIFAR's augmentation and threat model.
CIFAR = ["dataset.shape=[3,32,32]", "dataset.num_classes=10", "dataset.crop_padding=4", "dataset.flip=true",
         "dataset.eps=8/255", "dataset.pgd_alpha=2/255"]
# The same code paths at toy size, for --smoke on the CPU.
TOY = ["dataset.shape=[3,12,12]", "dataset.num_classes=10", "dataset.crop_padding=2", "dataset.flip=true",
       "dataset.eps=8/255", "dataset.pgd_alpha=2/255", "arch=bn_cnn"]  # BatchNorm: OAT runs on it too
PGD10 = ["method=pgd", "method.steps=10"]

# The cost table's settings per method; a method not named here (one added later) runs with its defaults.
METHOD_ROWS = {
    "pgd": ("pgd-10", PGD10),
    "natural": ("natural", ["method=natural"]),
    "fgsm_rs": ("fgsm_rs", ["method=fgsm_rs"]),
    "free": ("free-8", ["method=free", "method.replays=8"]),
    "trades": ("trades-10", ["method=trades", "method.steps=10"]),
    "awp": ("awp-pgd10", ["method=awp", "method.steps=10"]),
    "rat": ("rat-trades10", ["method=rat", "method.steps=10"]),
    "mart": ("mart-10", ["method=mart", "method.steps=10"]),
}


@dataclass
class Command:
    argv: list[str]
    result: Path | None = None       # the JSON file the command writes
    run_dir: Path | None = None      # an advtrain run's directory (results.json)


@dataclass
class Step:
    name: str
    title: str
    cap_s: float
    commands: list[Command] = field(default_factory=list)


def method_names() -> list[str]:
    """The methods advtrain ships, as its methods package finds them. PGD-10 first: it is the yardstick."""
    from advtrain.methods import discover

    names = sorted(discover())
    return ["pgd", *[n for n in names if n != "pgd"]]


def needs_teacher(name: str) -> bool:
    """A method whose `teacher` the user must give (RRM): its Config leaves it unset."""
    from advtrain.methods import method_defaults

    defaults = method_defaults({"name": name})
    return "teacher" in defaults and defaults["teacher"] is None


def cost_rows(teacher: Path) -> list[str]:
    rows = []
    for name in method_names():
        label, overrides = METHOD_ROWS.get(name, (name, [f"method={name}"]))
        if needs_teacher(name):  # a one-step model of the same shape: the cost does not depend on its weights
            overrides = [*overrides, f"method.teacher={teacher}"]
        rows += ["--row", f"{label}: {' '.join(overrides)}"]
    return rows


def plan(out: Path, smoke: bool) -> list[Step]:
    py = sys.executable
    raw = out / "raw"
    data = TOY if smoke else CIFAR
    preact = [] if smoke else ["arch=preact_resnet18"]
    batch = ["trainer.batch_size=16"] if smoke else ["trainer.batch_size=512"]
    timing = ["--steps", "1", "--repeats", "1", "--warmup", "1", "--workers", "0"] if smoke else \
        ["--steps", "10", "--repeats", "3", "--warmup", "3"]
    bench = [py, "scripts/bench.py", *timing]
    pgd10 = [*PGD10, *preact, *data, *batch]

    def e2e(name: str, launcher: list[str], extra: list[str]) -> Command:
        run_dir = out / "e2e" / name
        size = (["dataset.n_train=128", "dataset.n_test=64", "eval.n=32", "trainer.batch_size=32",
                 "trainer.epochs=1", "attack.autoattack.version=custom", "+attack.autoattack.attacks=[apgd-ce]",
                 "trainer.precision=bf16", "trainer.channels_last=true", "trainer.accelerator=cpu"] if smoke else
                ["dataset.n_train=10240", "dataset.n_test=1000", "eval.n=500", "trainer.batch_size=512",
                 "trainer.epochs=2", "trainer.precision=bf16", "trainer.channels_last=true"])
        argv = [*launcher, "-m", "advtrain", "dataset=synthetic", *data, *preact, *PGD10, "attack=[pgd20,autoattack]",
                "logger=none", "trainer.progress=lines", "resume=never", *size, *extra, f"hydra.run.dir={run_dir}"]
        return Command(argv, run_dir=run_dir)

    torchrun = [py, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1"]
    steps = [
        Step("ceilings", "Device ceilings: dense matmul and copy bandwidth", 40,
             [Command([py, "scripts/device_ceilings.py", *(["--n", "256", "--copy-mib", "16"] if smoke else []),
                       "--json", str(raw / "ceilings.json")], raw / "ceilings.json")]),
        Step("pgd10", "PGD-10 AT, PreActResNet-18, 32×32×3, batch 512: fast path, reference and ablations", 150,
             [Command([*bench, "--ablate", "--skip", "compile", "--json", str(raw / "pgd10.json"), *pgd10],
                      raw / "pgd10.json")]),
        Step("wrn", "PGD-10 AT, WRN-34-10, 32×32×3, batch 128", 60,
             [Command([*bench, "--no-reference", "--json", str(raw / "wrn.json"), *PGD10, *data,
                       *([] if smoke else ["arch=wrn34_10", "trainer.batch_size=128"]),
                       *(batch if smoke else [])], raw / "wrn.json")]),
        Step("costs", "Every method on PreActResNet-18 at CIFAR shape, side by side", 150, [
            Command([py, "-m", "advtrain", "dataset=synthetic", *data, *preact, *batch, "method=natural",
                     "trainer.epochs=1", f"dataset.n_train={16 if smoke else 512}", "dataset.n_test=16", "attack=[]",
                     "logger=none", "trainer.progress=off", "resume=never", f"hydra.run.dir={out / 'teacher'}"]),
            Command([*bench, *cost_rows(out / "teacher" / "checkpoints" / "last.pt"), "--json",
                     str(raw / "costs.json"), *preact, *data, *batch], raw / "costs.json")]),
        Step("e2e", "End to end: python -m advtrain, and torchrun", 150,
             [e2e("devices1", [py], ["trainer.devices=1"]), e2e("torchrun", torchrun, [])]),
        Step("profile", "Where the PGD-10 step's time goes: top kernels", 40,
             [Command([py, "scripts/bench_profile.py", *(["--steps", "1", "--warmup", "1"] if smoke else []),
                       "--json", str(raw / "profile.json"), *pgd10], raw / "profile.json")]),
        # The CPU smoke measures the noise-floor row instead: compiling takes minutes on a CPU.
        Step("compile", "PGD-10 fast path against torch.compile and CUDA graphs", 180,
             [Command([*bench, "--ablate", "--no-reference", "--only", "measured again" if smoke else "compile",
                       "--json", str(raw / "compile.json"), *pgd10], raw / "compile.json")]),
    ]
    assert tuple(s.name for s in steps) == STEP_NAMES
    return steps


def run_command(cmd: Command, log: Path, timeout_s: float, env: dict) -> tuple[str, float, str | None]:
    """(status, seconds, error). The command runs in a process group of its own, so a cut also ends its children
    (DataLoader workers, torchrun's ranks)."""
    t0 = time.perf_counter()
    with open(log, "w") as f:
        f.write(f"$ {shlex.join(cmd.argv)}\n")
        f.flush()
        proc = subprocess.Popen(cmd.argv, cwd=REPO, stdout=f, stderr=subprocess.STDOUT, env=env,
                                stdin=subprocess.DEVNULL, start_new_session=True)
        try:
            rc = proc.wait(timeout=max(timeout_s, 1))
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            return "cut", time.perf_counter() - t0, f"cut after {timeout_s:.0f} s (the step's cap)"
    seconds = time.perf_counter() - t0
    if rc != 0:
        lines = [line for line in log.read_text(errors="replace").splitlines() if line.strip()]
        return "failed", seconds, f"exit status {rc}: {lines[-1][:300] if lines else ''}"
    return "ok", seconds, None


def e2e_result(run_dir: Path, smoke: bool) -> dict:
    """results.json's numbers, and the checks a user would make of them."""
    path = run_dir / "results.json"
    if not path.is_file():
        return {"checks": {"results.json written": False}}
    r = json.loads(path.read_text())
    ev = r["eval"]
    expected_n = 32 if smoke else 500
    checks = {
        "results.json written": True,
        f"evaluated on {expected_n} examples": ev.get("n") == expected_n,
        "accuracies in [0, 1]": all(0 <= ev.get(k, -1) <= 1 for k in ("clean", "pgd20", "autoattack")),
        "AutoAttack <= PGD-20 <= clean": ev.get("autoattack", 2) <= ev.get("pgd20", 2) <= ev.get("clean", -1),
        "trained on the GPU": smoke or str(r.get("device", "")).startswith("cuda"),
        "bf16": r.get("precision") == "bf16",
    }
    return {"clean": ev.get("clean"), "pgd20": ev.get("pgd20"), "autoattack": ev.get("autoattack"), "n": ev.get("n"),
            "train_time_s": r.get("train_time_s"), "images_per_s": r.get("images_per_s"),
            "passes_per_example": r.get("passes_per_example"), "device": r.get("device"),
            "world_size": r.get("world_size"), "precision": r.get("precision"), "checks": checks}


def environment() -> dict:
    import torch

    env = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
           "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
           "gpu": None, "gpu_count": 0, "driver": None, "host_cpus": os.cpu_count(), "advtrain_commit": None}
    if torch.cuda.is_available():
        env["gpu"], env["gpu_count"] = torch.cuda.get_device_name(0), torch.cuda.device_count()
        props = torch.cuda.get_device_properties(0)
        env["gpu_memory_gib"], env["sm_count"] = props.total_memory / 2**30, props.multi_processor_count
    for key, argv in (("driver", ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"]),
                      ("advtrain_commit", ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"])):
        try:
            env[key] = subprocess.run(argv, capture_output=True, text=True, timeout=20).stdout.strip() or None
        except (OSError, subprocess.SubprocessError):
            pass
    return env


def summarize(steps: dict) -> dict:
    """The issue's targets against step pgd10's fast path."""
    bench = (steps.get("pgd10") or {}).get("result")
    if not bench:
        return {}
    fast = bench["rows"][0]
    got = {"of_matrix_rate": fast.get("of_matrix_rate"), "speedup_vs_reference": bench.get("speedup_vs_reference"),
           "host_syncs_per_step": fast.get("host_syncs_per_step")}
    met = {k: (None if v is None else v <= TARGETS[k] if k == "host_syncs_per_step" else v >= TARGETS[k])
           for k, v in got.items()}
    return {"targets": TARGETS, "measured": got, "met": met}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n".join(__doc__.splitlines()[12:]))
    parser.add_argument("out", type=Path, help="folder for gpu_check.json, gpu_check.md and logs/")
    parser.add_argument("--smoke", action="store_true", help="every step at toy size on the CPU (about a minute)")
    parser.add_argument("--only", default=",".join(STEP_NAMES), help=f"steps to run (default all: "
                                                                       f"{','.join(STEP_NAMES)})")
    parser.add_argument("--budget-s", type=float, default=470.0,
                        help="seconds for all steps together; a step gets the least of its cap and what is left")
    opts = parser.parse_args(argv)
    only = [s.strip() for s in opts.only.split(",") if s.strip()]
    unknown = [s for s in only if s not in STEP_NAMES]
    if unknown:
        parser.error(f"--only {unknown[0]!r} is not a step; steps: {', '.join(STEP_NAMES)}")
    out = opts.out.resolve()
    (out / "logs").mkdir(parents=True, exist_ok=True)
    (out / "raw").mkdir(exist_ok=True)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
           "PYTHONUNBUFFERED": "1", "WANDB_MODE": "disabled"}
    if opts.smoke:
        env["CUDA_VISIBLE_DEVICES"] = ""  # the toy sizes are for the CPU, even where a GPU is present
    started = time.perf_counter()
    deadline = started + opts.budget_s
    report = {"smoke": opts.smoke, "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
              "budget_s": opts.budget_s, "environment": environment(), "steps": {}}
    for step in plan(out, opts.smoke):
        if step.name not in only:
            continue
        entry = report["steps"][step.name] = {"title": step.title, "cap_s": step.cap_s, "status": "ok",
                                             "wall_s": 0.0, "commands": [], "error": None}
        step_deadline = min(time.perf_counter() + step.cap_s, deadline)
        for i, cmd in enumerate(step.commands):
            left = step_deadline - time.perf_counter()
            log = out / "logs" / f"{step.name}{'-' + str(i + 1) if len(step.commands) > 1 else ''}.log"
            shown = shlex.join(cmd.argv).replace(sys.executable, "python").replace(str(out), "$OUT")
            if left < 1:
                status, seconds, error = "cut", 0.0, "not started: the step's cap or the budget was spent"
            else:
                print(f"gpu_check: {step.name}: {shown}", flush=True)
                status, seconds, error = run_command(cmd, log, left, env)
            entry["commands"].append({"command": shown, "status": status, "wall_s": round(seconds, 1),
                                      "log": str(log.relative_to(out)), "error": error})
            entry["wall_s"] = round(entry["wall_s"] + seconds, 1)
            if status != "ok" and entry["status"] == "ok":
                entry["status"], entry["error"] = status, error
        results = [json.loads(c.result.read_text()) for c in step.commands if c.result and c.result.is_file()]
        if step.name == "e2e":
            entry["result"] = {c.run_dir.name: e2e_result(c.run_dir, opts.smoke) for c in step.commands}
            if entry["status"] == "ok" and not all(all(r["checks"].values()) for r in entry["result"].values()):
                entry["status"], entry["error"] = "failed", "a results.json check failed (see result.*.checks)"
        else:
            entry["result"] = results[0] if results else None
        print(f"gpu_check: {step.name}: {entry['status']} in {entry['wall_s']:.0f} s"
              + (f" ({entry['error']})" if entry["error"] else ""), flush=True)
    report["summary"] = summarize(report["steps"])
    report["wall_s"] = round(time.perf_counter() - started, 1)
    (out / "gpu_check.json").write_text(json.dumps(report, indent=2) + "\n")
    tables = render(report)
    (out / "gpu_check.md").write_text(tables)
    print(tables)
    return 0 if all(s["status"] == "ok" for s in report["steps"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
