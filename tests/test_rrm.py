"""RRM: a student learns a frozen teacher's features on clean inputs. The teacher stays frozen and outside the
student (optimizer, checkpoint, DDP); a projection appears only where the feature sizes differ; bad teachers are one
line; the cost counts the teacher's forward and results.json both training times."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from advtrain.engine.checkpoint import load_checkpoint
from advtrain.errors import CheckpointError
from advtrain.engine.precision import resolve_runtime
from advtrain.engine.run import build_parts
from conftest import TINY, checked, run_cli

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def teacher(tmp_path_factory) -> Path:
    """A PGD-AT mnist_net on the tiny synthetic data."""
    run_dir = tmp_path_factory.mktemp("teacher")
    proc = run_cli([*TINY, "method=pgd", "trainer.epochs=2", "attack=[]", f"hydra.run.dir={run_dir}"], cwd=run_dir)
    assert proc.returncode == 0, proc.stderr
    return run_dir / "checkpoints" / "last.pt"


def _parts(teacher: Path, *overrides):
    cfg = checked([*TINY, "method=rrm", f"method.teacher={teacher}", *overrides])
    return build_parts(cfg, resolve_runtime(cfg.trainer))


def test_the_teacher_is_frozen_and_outside_the_student(teacher):
    parts = _parts(teacher)
    frozen = parts.companions["teacher"]
    assert not frozen.training and not any(p.requires_grad for p in frozen.parameters())
    in_optimizer = {id(p) for group in parts.optimizer.param_groups for p in group["params"]}
    assert not in_optimizer & {id(p) for p in frozen.parameters()}
    assert in_optimizer == {id(p) for p in parts.model.parameters()}
    assert not hasattr(parts.model, "rrm_projection")  # the same architecture: the same feature size


def test_a_projection_joins_features_of_different_sizes_and_feeds_the_classifier(teacher):
    """The authors' layout: the projection is the student's last body layer, the classifier reads its output."""
    parts = _parts(teacher, "arch=madry_cnn")  # a 1024-value penultimate layer, the teacher's has 100
    projection = parts.model.body[-1].linear
    assert (projection.in_features, projection.out_features) == (1024, 100) and parts.model.feature_dim == 100
    x = torch.rand(2, 1, 12, 12)
    logits, features = parts.model(x, features=True)
    assert features.shape == (2, 100) and torch.allclose(logits, parts.model.head(features))
    assert {id(p) for p in projection.parameters()} <= {id(p) for g in parts.optimizer.param_groups
                                                        for p in g["params"]}


def test_a_loss_only_projection_leaves_the_classifier_on_the_students_features(teacher):
    parts = _parts(teacher, "arch=madry_cnn", "method.head_on_projection=false")
    projection = parts.model.rrm_projection.linear
    assert (projection.in_features, projection.out_features) == (1024, 100) and parts.model.feature_dim == 1024
    logits, features = parts.model(torch.rand(2, 1, 12, 12), features="rrm_projection")
    assert logits.shape == (2, 4) and features.shape == (2, 100)


def test_a_teacher_from_an_older_version_loads(teacher, tmp_path):
    """A checkpoint written before its method gained a knob (pgd's adv_weight) rebuilds with the knob's default."""
    from advtrain.engine.checkpoint import save_checkpoint
    import advtrain

    state = load_checkpoint(teacher)
    del state["model_spec"]["method"]["adv_weight"]
    old = tmp_path / "old.pt"
    save_checkpoint(state, old)
    assert torch.equal(advtrain.load_model(old).head.weight, advtrain.load_model(teacher).head.weight)
    assert _parts(old).companions["teacher"].feature_dim == 100


@pytest.mark.slow
def test_rrm_trains_the_student_only_and_records_both_times(teacher, tmp_path):
    before = {k: v.clone() for k, v in load_checkpoint(teacher)["model"].items()}
    run_dir = tmp_path / "student"
    proc = run_cli([*TINY, "method=rrm", f"method.teacher={teacher}", "arch=madry_cnn", f"hydra.run.dir={run_dir}"],
                   cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    after = load_checkpoint(teacher)["model"]
    assert all(torch.equal(before[k], after[k]) for k in before)  # bitwise unchanged

    results = json.loads((run_dir / "results.json").read_text())
    assert results["passes_per_example"] == pytest.approx(1 + 1 / 3)
    teacher_time = load_checkpoint(teacher)["loop"]["train_time_s"]
    assert results["companions"] == {"teacher": {"checkpoint": str(teacher), "train_time_s": teacher_time}}
    assert results["train_time_with_companions_s"] == pytest.approx(results["train_time_s"] + teacher_time)
    student = load_checkpoint(run_dir / "checkpoints" / "last.pt")
    projection = student["model"]["body.1.linear.weight"]  # the projection, a layer of the student
    assert not any(k.startswith("teacher") for k in student["model"]) and student["companions"]["teacher"]
    import advtrain

    rebuilt = advtrain.load_model(run_dir / "checkpoints" / "last.pt")  # from the checkpoint alone
    assert torch.equal(rebuilt.body[1].linear.weight, projection) and rebuilt.feature_dim == projection.shape[0]

    proc = run_cli([str(tmp_path), "--out", str(tmp_path / "report")], cwd=tmp_path, program="advtrain-report")
    assert proc.returncode == 0 and "with companions (s)" in proc.stdout, proc.stdout


@pytest.mark.slow
@pytest.mark.parametrize("case", ["missing", "corrupt", "other_shape"])
def test_a_bad_teacher_is_one_line(case, teacher, tmp_path):
    bad = {"missing": tmp_path / "nowhere.pt", "corrupt": tmp_path / "corrupt.pt"}.get(case, teacher)
    if case == "corrupt":
        bad.write_bytes(teacher.read_bytes()[:3000])
    extra = ["dataset.shape=[1,16,16]"] if case == "other_shape" else []
    run_dir = tmp_path / "run"
    proc = run_cli([*TINY, "method=rrm", f"method.teacher={bad}", *extra, f"hydra.run.dir={run_dir}"], cwd=tmp_path)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    expected = {"missing": "checkpoint not found", "corrupt": "is corrupt",
                "other_shape": "images of shape (1, 12, 12) with 4 classes; this run's synthetic has (1, 16, 16)"}
    assert "the method's teacher model" in proc.stderr and expected[case] in proc.stderr
    assert not run_dir.exists()


@pytest.mark.slow
def test_rrm_trains_on_two_gloo_ranks(teacher, tmp_path):
    run_dir = tmp_path / "ddp"
    proc = run_cli([*TINY, "method=rrm", f"method.teacher={teacher}", "arch=madry_cnn", "trainer.devices=2",
                    "trainer.accelerator=cpu", f"hydra.run.dir={run_dir}"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    results = json.loads((run_dir / "results.json").read_text())
    assert results["world_size"] == 2 and results["passes_per_example"] == pytest.approx(1 + 1 / 3)


def test_a_teacher_whose_run_has_not_finished_is_refused(teacher, tmp_path):
    """A sweep that trains the teacher beside its students (experiment=fashion_mnist_methods) must not hand a
    student a half-trained teacher: an epoch checkpoint of an unfinished run is refused in one line."""
    from advtrain.engine.checkpoint import save_checkpoint

    state = load_checkpoint(teacher)
    state["loop"].update(finished=False, epoch=1)
    unfinished = tmp_path / "unfinished.pt"
    save_checkpoint(state, unfinished)
    with pytest.raises(CheckpointError, match=r"^the method's teacher model .*unfinished.pt is from a run that has not "
                                              r"finished training \(it stands at epoch 1\)"):
        _parts(unfinished)
