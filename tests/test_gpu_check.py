"""scripts/gpu_check.py, the one-command GPU check: every step at toy size on the CPU (--smoke) with every field
produced, cut steps, and the tables it writes into the docs. Speed is never asserted here."""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO
from hidden_packages import hiding_env

sys.path.insert(0, str(REPO / "scripts"))


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def gpu_check():
    return _load("gpu_check")


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """One --smoke run, as on the bare GPU machine: no wandb, no submitit, the repo on PYTHONPATH."""
    out = tmp_path_factory.mktemp("gpu_check")
    env = hiding_env(out / "hide", ["wandb", "submitit"], repo=REPO)
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "gpu_check.py"), str(out / "out"), "--smoke"],
                          capture_output=True, text=True, timeout=900, env=env, cwd=out, stdin=subprocess.DEVNULL)
    report = json.loads((out / "out" / "gpu_check.json").read_text())
    return proc, report, out / "out"


@pytest.mark.slow
def test_smoke_runs_every_step(smoke, gpu_check):
    proc, report, out = smoke
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert report["smoke"] is True and list(report["steps"]) == list(gpu_check.STEP_NAMES)
    for name, step in report["steps"].items():
        assert step["status"] == "ok" and step["error"] is None, (name, step)
        assert step["commands"] and all(c["command"].startswith("python ") for c in step["commands"])
        assert all((out / c["log"]).is_file() for c in step["commands"])
        assert step["result"], name
    for key in ("python", "torch", "cuda", "cudnn", "gpu", "driver", "advtrain_commit"):
        assert key in report["environment"]


@pytest.mark.slow
def test_smoke_produces_every_number(smoke, gpu_check):
    _, report, out = smoke
    steps = report["steps"]
    ceilings = steps["ceilings"]["result"]
    assert min(ceilings["bf16_matmul_tflops"], ceilings["fp32_matmul_tflops"], ceilings["copy_gb_per_s"]) > 0

    pgd10 = steps["pgd10"]["result"]
    names = [r["name"] for r in pgd10["rows"]]
    assert names[:2] == ["fast path (advtrain)", "reference (papers' loop)"]
    assert "attack grads into weights" in names and not any("compile" in n for n in names)
    fast = pgd10["rows"][0]
    assert fast["passes_per_example"] == pytest.approx(11.0) and fast["of_matrix_rate"] > 0
    assert fast["attack_share"] + fast["update_share"] == pytest.approx(1.0)
    assert set(report["summary"]["measured"]) == set(gpu_check.TARGETS) == set(report["summary"]["met"])
    assert report["summary"]["measured"]["speedup_vs_reference"] > 0

    assert steps["wrn"]["result"]["rows"][0]["images_per_s"] > 0

    costs = {r["name"]: r for r in steps["costs"]["result"]["rows"]}
    methods = sorted(p.stem for p in (REPO / "advtrain" / "conf" / "method").glob("*.yaml"))
    assert len(costs) == len(methods)  # one row per shipped method, later ones included
    assert list(costs)[0] == "pgd-10" and costs["pgd-10"]["vs_fast_path"] == 1.0
    for name, passes in (("pgd-10", 11.0), ("natural", 1.0), ("fgsm_rs", 2.0), ("free-8", 8.0)):
        assert costs[name]["passes_per_example"] == pytest.approx(passes), name
    assert all(r["error"] is None and r["images_per_s"] > 0 for r in costs.values())

    e2e = steps["e2e"]["result"]
    assert set(e2e) == {"devices1", "torchrun"}
    for launch, r in e2e.items():
        assert all(r["checks"].values()) and len(r["checks"]) == 6, (launch, r["checks"])
        assert r["n"] == 32 and r["world_size"] == 1 and r["autoattack"] <= r["pgd20"] <= r["clean"]

    profile = steps["profile"]["result"]
    assert len(profile["top"]) == 10 and 0 < profile["busy"]
    assert sum(t["share"] for t in profile["top"]) <= 1 + 1e-9

    assert [r["name"] for r in steps["compile"]["result"]["rows"]] == ["fast path (advtrain)",
                                                                      "fast path, measured again"]
    tables = (out / "gpu_check.md").read_text()
    for name in gpu_check.STEP_NAMES:
        assert f"### {name}: " in tables
    assert "advtrain / reference:" in tables and "| devices1 |" in tables and "| trades-10 |" in tables


def test_a_step_over_its_cap_is_cut_with_its_children(gpu_check, tmp_path):
    # The child starts a grandchild and both wait forever; the cut must end both.
    pid_file = tmp_path / "grandchild.pid"
    code = ("import subprocess, sys, threading; "
            "p = subprocess.Popen([sys.executable, '-c', 'import threading; threading.Event().wait()']); "
            f"open({str(pid_file)!r}, 'w').write(str(p.pid)); threading.Event().wait()")
    cmd = gpu_check.Command([sys.executable, "-c", code])
    status, seconds, error = gpu_check.run_command(cmd, tmp_path / "log", timeout_s=10, env=None)
    assert status == "cut" and "cut after 10 s" in error
    if pid_file.exists() and pid_file.read_text():  # the child got that far before its cap (it does but on a
        stat = Path(f"/proc/{int(pid_file.read_text())}/stat")  # machine so loaded that Python took 10 s to start)

        def alive() -> bool:
            try:
                return stat.read_text().rpartition(")")[2].split()[0] not in ("Z", "X")
            except OSError:
                return False

        deadline = time.monotonic() + 30  # SIGKILL is delivered at once, the teardown takes its moment
        while alive() and time.monotonic() < deadline:
            pass
        assert not alive()


def test_a_failed_command_reports_its_last_line(gpu_check, tmp_path):
    cmd = gpu_check.Command([sys.executable, "-c", "import sys; print('first'); sys.exit('the reason')"])
    status, _, error = gpu_check.run_command(cmd, tmp_path / "log", timeout_s=60, env=None)
    assert status == "failed" and error == "exit status 1: the reason"


def test_a_spent_budget_cuts_the_remaining_steps(gpu_check, tmp_path):
    assert gpu_check.main([str(tmp_path), "--smoke", "--only", "ceilings,profile", "--budget-s", "0"]) == 1
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert list(report["steps"]) == ["ceilings", "profile"]
    assert all(s["status"] == "cut" and "not started" in s["error"] for s in report["steps"].values())
    assert "**cut**: not started" in (tmp_path / "gpu_check.md").read_text()


def test_unknown_step_is_one_line(tmp_path):
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "gpu_check.py"), str(tmp_path), "--only", "nope"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "'nope' is not a step" in proc.stderr
    assert not (tmp_path / "gpu_check.json").exists()


def test_docs_tables_are_replaced_between_the_markers_only(tmp_path):
    tables = _load("gpu_tables")
    doc = tmp_path / "doc.md"
    doc.write_text(f"# Title\nbefore\n{tables.BEGIN}\nold table\n{tables.END}\nafter\n")
    tables.update(doc, "| new |\n")
    tables.update(doc, "| newer |\n")  # idempotent: a second update replaces the first
    assert doc.read_text() == f"# Title\nbefore\n{tables.BEGIN}\n| newer |\n{tables.END}\nafter\n"
    plain = tmp_path / "plain.md"
    plain.write_text("no markers\n")
    with pytest.raises(SystemExit, match="no <!-- gpu_check:begin -->"):
        tables.update(plain, "t")
    assert plain.read_text() == "no markers\n"


def test_the_docs_gpu_tables_are_the_committed_json_rendered():
    """docs/performance.md's GPU numbers come from docs/bench/gpu_check.json through scripts/gpu_tables.py, never
    typed by hand; without that JSON the block holds no numbers at all."""
    tables = _load("gpu_tables")
    doc = (REPO / "docs" / "performance.md").read_text()
    block = doc.split(tables.BEGIN + "\n", 1)[1].split(tables.END, 1)[0]
    measured = REPO / "docs" / "bench" / "gpu_check.json"
    if measured.is_file():
        assert block == tables.render(json.loads(measured.read_text()), level=4)
    else:
        assert "Not measured yet" in block and "|" not in block
