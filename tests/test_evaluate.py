"""The evaluation itself: seeded, so the same model gives the same numbers twice, and the caller's random stream
is left as it was."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from advtrain.data.loader import TensorEvalSet
from advtrain.engine.evaluate import evaluate, evaluate_views
from advtrain.methods.base import View

# A random start that decides the outcome: one tiny step from a start anywhere in a wide ball.
RANDOM_START = {"pgd": {"type": "pgd", "eps": 0.5, "alpha": 0.001, "steps": 1, "restarts": 1}}


def _setup():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
    images = torch.randint(0, 256, (512, 1, 4, 4), dtype=torch.uint8)
    labels = model(images.float() / 255).argmax(1)  # every example clean-correct: only the attack decides
    return model, TensorEvalSet(images, labels)


def test_the_same_seed_gives_the_same_numbers_and_leaves_the_callers_rng_alone():
    model, evalset = _setup()
    torch.manual_seed(123)
    before = torch.get_rng_state()
    first = evaluate(model, evalset, RANDOM_START, n=None, batch_size=128, seed=0)
    assert torch.equal(torch.get_rng_state(), before)
    torch.rand(1000)  # whatever the caller's stream did meanwhile does not matter
    assert evaluate(model, evalset, RANDOM_START, n=None, batch_size=128, seed=0) == first
    other = evaluate(model, evalset, RANDOM_START, n=None, batch_size=128, seed=1)
    assert other["pgd"] != first["pgd"] and other["clean"] == first["clean"] == 1.0
    assert 0.05 < first["pgd"] < 0.95  # the random start matters here, or the test could not fail


def test_the_progress_lines_show_accuracy_in_percent():
    model, evalset = _setup()
    lines = []
    scores = evaluate(model, evalset, RANDOM_START, n=None, batch_size=512, seed=0, on_progress=lines.append)
    assert len(lines) == 1 and lines[0].startswith("eval: 512 examples of 512, clean 100.00%, pgd "), lines
    assert f"pgd {100 * scores['pgd']:.2f}% (" in lines[0]


def test_a_multi_batch_evaluation_shows_each_batch_the_attack_under_way_and_autoattack_s_stages(capsys):
    """What a cluster log shows while an evaluation runs (not a terminal: lines, here one per event)."""
    from advtrain.logging.console import EvalProgress

    model, evalset = _setup()
    suite = {**RANDOM_START, "aa": {"type": "autoattack", "eps": 0.1, "norm": "linf", "version": "custom",
                                    "attacks": ["apgd-ce", "apgd-t"], "seed": 0}}
    with EvalProgress("lines", log_every_s=0) as display:
        evaluate_views(model, evalset, suite, n=64, batch_size=32, on_progress=display.line, watch=display)
    lines = capsys.readouterr().out.splitlines()
    assert [line for line in lines if "running" in line] == [
        f"eval: running {attack}, batch {b}/2" for b in (1, 2) for attack in ("pgd", "aa")]
    assert [line.partition(",")[0] for line in lines if "examples of" in line] == [
        "eval: 32 examples of 64", "eval: 64 examples of 64"]
    assert all("ETA" in line for line in lines if "examples of" in line)
    stages = [line.split(" done")[0] for line in lines if "done on this batch" in line]
    assert stages == ["eval: aa apgd-ce", "eval: aa apgd-t"] * 2, lines  # (eps 0.1 leaves robust ones for APGD-T)


def test_the_progress_bar_keeps_the_count_and_the_times_on_an_80_column_terminal(monkeypatch):
    """At 80 columns the metrics give way, whole ones from the end, never the step count or the ETA."""
    import io

    from rich.console import Console

    from advtrain.logging import console as con

    monkeypatch.setattr(con, "console", Console(file=io.StringIO(), width=80, force_terminal=True))
    with con.TrainProgress(30, 6250, "bar") as progress:
        progress.epoch(2)
        for _ in range(377):
            progress.step()
        progress.show({"loss": 0.4312, "acc": 0.8123, "lr": 0.004512, "img/s": 1523.0, "eps": 0.031})
        bar = progress._bar
        shown = io.StringIO()
        Console(file=shown, width=80, force_terminal=True, color_system=None).print(bar.make_tasks_table(bar.tasks))
    row = shown.getvalue().rstrip()
    assert "377/6250" in row and row.count(":") >= 4 and "…" not in row, row  # elapsed and ETA whole
    assert "loss 0.4312" in row and "eps" not in row  # the first metrics kept, the last dropped


# --- an evaluation stopped part-way goes on from its last batch -----------------------------------------------------
class _Stop(Exception):
    pass


def _stopping_after(batches: int):
    """on_progress that stops the evaluation once `batches` batches have been counted (as a signal would)."""
    seen = []

    def on_progress(line):
        seen.append(line)
        if sum(" examples" in s and "resumed" not in s for s in seen) == batches:
            raise _Stop
    return on_progress


def _views_evaluation(model, evalset, progress_file, on_progress, seed=0):
    views = (View("a"), View("b"))  # two settings of one model: the second starts where the first left the RNG
    return evaluate_views(model, evalset, RANDOM_START, n=None, batch_size=64, seed=seed, views=views,
                          on_progress=on_progress, progress_file=progress_file)


@pytest.mark.parametrize("stop_after", [3, 8, 11, 16])  # mid-view a, at its end, mid-view b, all done
def test_a_stopped_evaluation_goes_on_to_the_uninterrupted_numbers(tmp_path, stop_after):
    model, evalset = _setup()
    straight = _views_evaluation(model, evalset, None, None)
    progress_file = tmp_path / "eval_progress.pt"
    with pytest.raises(_Stop):
        _views_evaluation(model, evalset, progress_file, _stopping_after(stop_after))
    lines = []
    resumed = _views_evaluation(model, evalset, progress_file, lines.append)
    assert resumed == straight
    # only the batches not done before were attacked (8 of 64 per view)
    assert lines[0].startswith("evaluation resumed from eval_progress.pt:")
    assert sum(" examples" in line for line in lines[1:]) == 16 - stop_after


def test_progress_kept_for_other_weights_or_settings_is_not_used(tmp_path):
    model, evalset = _setup()
    progress_file = tmp_path / "eval_progress.pt"
    with pytest.raises(_Stop):
        _views_evaluation(model, evalset, progress_file, _stopping_after(5))
    lines = []
    other_seed = _views_evaluation(model, evalset, progress_file, lines.append, seed=1)
    assert other_seed == _views_evaluation(model, evalset, None, None, seed=1)
    assert sum(" examples" in line for line in lines) == 16 and not any("resumed" in line for line in lines)
    with pytest.raises(_Stop):
        _views_evaluation(model, evalset, progress_file, _stopping_after(5))
    with torch.no_grad():
        model[1].weight[0, 0] += 1e-6  # other weights, however close
    lines = []
    assert _views_evaluation(model, evalset, progress_file, lines.append) == _views_evaluation(model, evalset, None,
                                                                                                None)
    assert sum(" examples" in line for line in lines) == 16


def test_a_damaged_progress_file_starts_the_evaluation_over(tmp_path):
    model, evalset = _setup()
    progress_file = tmp_path / "eval_progress.pt"
    progress_file.write_bytes(b"half a file")
    assert _views_evaluation(model, evalset, progress_file, None) == _views_evaluation(model, evalset, None, None)
    assert torch.load(progress_file, weights_only=True)["views"]["b"]["batches"] == 8  # replaced by a good one
