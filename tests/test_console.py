"""Console output as cluster logs see it (not a terminal): one record per line, never wrapped."""
from __future__ import annotations

import subprocess
import sys


def test_output_to_a_file_is_not_wrapped_at_80_columns():
    line = "epoch 3/30 batch 390/390  " + "  ".join(f"metric_{i} {i}.123" for i in range(12)) + "  img/s 4.139"
    assert len(line) > 150
    code = f"from advtrain.logging import console as c; c.console.print({line!r}, markup=False)"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={"PATH": "", "TERM": "dumb"})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == line + "\n"


def test_the_results_table_shows_accuracies_in_percent(capsys):
    from advtrain.logging.console import print_results

    results = {"method": "oat", "dataset": "mnist", "arch": "bn_cnn", "train_time_s": 12.3, "images_per_s": 1000.0,
               "passes_per_example": 7.67, "eval": {"n": 1000, "clean": 0.975, "pgd20": 0.8912},
               "views": {"lambda=0": {"n": 1000, "clean": 0.975, "pgd20": 0.8912},
                         "lambda=1": {"n": 1000, "clean": 0.9, "pgd20": 0.05}}}
    print_results(results)
    out = capsys.readouterr().out
    for shown in ("97.50%", "89.12%", "90.00%", "5.00%", "1000", "12.3 s"):
        assert shown in out, out
    assert "0.9750" not in out and "0.8912" not in out


def test_epoch_lines_show_accuracies_in_percent_and_the_rest_as_they_are():
    from advtrain.logging.console import metrics_text

    line = metrics_text({"train/loss": 0.4321, "train/acc": 0.8123, "method/guard_pgd_acc": 0.5, "lr": 0.1,
                         "eval/clean": 0.975, "eval/n": 10000, "eval/lambda=0.3/pgd20": 0.5})
    assert line == ("train/loss 0.4321  train/acc 81.23%  method/guard_pgd_acc 50.00%  lr 0.1  eval/clean 97.50%  "
                    "eval/n 10000  eval/lambda=0.3/pgd20 50.00%")
