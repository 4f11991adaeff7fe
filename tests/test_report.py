"""`advtrain-report` on hand-written results.json files: aggregation, csv/md/png outputs, --metric, W&B, errors."""
from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
import wandb

from advtrain.report import main
from advtrain.report.table import aggregate, collect, expand_views, metric_names
from wandb_records import _chunks, read_run

# (method, dataset, arch, seed, train_time_s, passes_per_example, eval accuracies as fractions)
RUNS = [
    ("pgd", "cifar10", "preact_resnet18", 0, 100.0, 11.0, {"clean": 0.80, "pgd20": 0.48, "autoattack": 0.44}),
    ("pgd", "cifar10", "preact_resnet18", 1, 110.0, 11.0, {"clean": 0.82, "pgd20": 0.50, "autoattack": 0.46}),
    ("fgsm_rs", "cifar10", "preact_resnet18", 0, 20.0, 2.0, {"clean": 0.84, "pgd20": 0.44, "autoattack": 0.40}),
    ("fgsm_rs", "cifar10", "preact_resnet18", 1, 24.0, 2.0, {"clean": 0.86, "pgd20": 0.45, "autoattack": 0.43}),
    # a dataset/arch without PGD-AT, without AutoAttack, and a method with one seed
    ("trades", "mnist", "mnist_net", 0, 30.0, 41.0, {"clean": 0.99, "pgd20": 0.95}),
    ("trades", "mnist", "mnist_net", 1, 34.0, 41.0, {"clean": 0.98, "pgd20": 0.93}),
    ("natural", "mnist", "mnist_net", 0, 5.0, 1.0, {"clean": 0.995, "pgd20": 0.0}),
]


@pytest.fixture
def sweep(tmp_path) -> Path:
    root = tmp_path / "sweep"
    for i, (method, dataset, arch, seed, time_s, passes, accs) in enumerate(RUNS):
        run_dir = root / f"{i}_{method}_{dataset}_seed{seed}"
        run_dir.mkdir(parents=True)
        results = {"method": method, "dataset": dataset, "arch": arch, "epochs": 10, "epochs_run": 10, "seed": seed,
                   "train_time_s": time_s, "epoch_times_s": [time_s / 10] * 10, "images_per_s": 1000.0,
                   "passes_per_example": passes, "eval": {"n": 1000, **accs}, "stop_reason": None}
        (run_dir / "results.json").write_text(json.dumps(results))
    (root / "crashed").mkdir()
    (root / "crashed" / "results.json").write_text('{"method": "pgd", "eval": {')
    return root


def report(argv, capsys) -> tuple[int, str, str]:
    try:
        main([str(a) for a in argv])
        status = 0
    except SystemExit as e:
        status = e.code
    out, err = capsys.readouterr()
    return status, out, err


def test_rows_are_mean_and_std_over_seeds_with_cost_relative_to_pgd(sweep, capsys):
    runs = collect(sweep)
    err = capsys.readouterr().err
    assert len(runs) == len(RUNS)
    assert err.count("\n") == 1 and "skipping" in err and str(sweep / "crashed" / "results.json") in err

    metrics = metric_names(runs)
    assert metrics == ["clean", "autoattack", "pgd20"]
    rows = {r.method: r for r in aggregate(runs, metrics)}
    assert [(r.dataset, r.method) for r in aggregate(runs, metrics)] == [
        ("cifar10", "fgsm_rs"), ("cifar10", "pgd"), ("mnist", "natural"), ("mnist", "trades")]

    pgd, fgsm = rows["pgd"], rows["fgsm_rs"]
    assert pgd.runs == 2 and pgd.acc_pct["clean"] == pytest.approx((81.0, math.sqrt(2)))  # std over seeds, ddof=1
    assert fgsm.acc_pct["autoattack"] == pytest.approx((41.5, math.sqrt(4.5)))
    assert fgsm.acc_pct["pgd20"] == pytest.approx((44.5, math.sqrt(0.5)))
    assert (pgd.train_time_s, fgsm.train_time_s, fgsm.passes_per_example) == pytest.approx((105.0, 22.0, 2.0))
    assert pgd.time_vs_pgd == 1.0 and fgsm.time_vs_pgd == pytest.approx(22.0 / 105.0)

    trades, natural = rows["trades"], rows["natural"]
    assert trades.time_vs_pgd is None and natural.time_vs_pgd is None  # no PGD-AT on mnist/mnist_net
    assert trades.acc_pct["autoattack"] == (None, None)
    assert natural.runs == 1 and natural.acc_pct["clean"] == pytest.approx((99.5, None))


def test_writes_csv_md_and_png(sweep, capsys):
    status, out, _ = report([sweep], capsys)
    assert status == 0
    assert "81.00 ± 1.41" in out and "fgsm_rs" in out and "0.21" in out  # fgsm_rs time / PGD-AT = 22 / 105

    with (sweep / "report.csv").open(newline="") as f:
        rows = {r["method"]: r for r in csv.DictReader(f)}
    assert list(rows) == ["fgsm_rs", "pgd", "natural", "trades"]
    pgd, fgsm, natural = rows["pgd"], rows["fgsm_rs"], rows["natural"]
    assert (float(pgd["clean_mean_pct"]), float(pgd["clean_std_pct"])) == pytest.approx((81.0, math.sqrt(2)))
    assert float(fgsm["autoattack_mean_pct"]) == pytest.approx(41.5)
    assert float(fgsm["autoattack_std_pct"]) == pytest.approx(math.sqrt(4.5))
    assert float(fgsm["train_time_s"]) == pytest.approx(22.0) and float(fgsm["passes_per_example"]) == 2.0
    assert float(pgd["time_vs_pgd"]) == 1.0 and float(fgsm["time_vs_pgd"]) == pytest.approx(22.0 / 105.0)
    assert natural["time_vs_pgd"] == "" and natural["clean_std_pct"] == "" and natural["autoattack_mean_pct"] == ""
    assert int(natural["runs"]) == 1 and float(natural["clean_mean_pct"]) == pytest.approx(99.5)

    md = (sweep / "report.md").read_text().splitlines()
    assert md[0].startswith("| method | dataset | arch | runs | clean (%) | autoattack (%) | pgd20 (%)")
    assert set(md[1]) <= set("|-:") and len(md) == 2 + 4
    assert md[2].startswith("| fgsm_rs | cifar10 | preact_resnet18 | 2 | 85.00 ± 1.41 | 41.50 ± 2.12 |")
    assert "| natural | mnist | mnist_net | 1 | 99.50 |" in md[4]

    png = (sweep / "report.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


def test_out_folder_and_metric_choice(sweep, tmp_path, capsys):
    status, out, _ = report([sweep, "--out", tmp_path / "reports" / "a"], capsys)
    assert status == 0 and "autoattack vs training time" in out  # autoattack: some run has it
    assert {p.name for p in (tmp_path / "reports" / "a").iterdir()} == {"report.csv", "report.md", "report.png"}
    assert not (sweep / "report.csv").exists()

    status, out, _ = report([sweep, "--out", tmp_path / "b", "--metric", "pgd20"], capsys)
    assert status == 0 and "pgd20 vs training time" in out and (tmp_path / "b" / "report.png").stat().st_size > 10_000

    status, out, err = report([sweep, "--metric", "cw"], capsys)
    error = err.splitlines()[-1]  # after the warning about the crashed run
    assert status == 2 and "Traceback" not in err and err.count("advtrain-report: error") == 1
    assert error == "advtrain-report: error: --metric cw is not in these runs; choose one of: clean, autoattack, pgd20"


def test_user_errors_are_one_line_with_status_2(tmp_path, capsys):
    status, _, err = report([tmp_path / "nowhere"], capsys)
    assert status == 2 and err == f"advtrain-report: error: {tmp_path / 'nowhere'} does not exist\n"
    status, _, err = report([tmp_path], capsys)
    assert status == 2 and err == f"advtrain-report: error: no results.json under {tmp_path}\n"
    status, _, err = report([], capsys)
    assert status == 2 and err == "advtrain-report: error: the following arguments are required: PATH\n"


def test_wandb_offline_run_holds_the_table_and_plot(sweep, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    status, _, err = report([sweep, "--wandb-project", "advtrain-test", "--wandb-group", "g"], capsys)
    assert status == 0, err
    # wandb.finish() can return before W&B's service has written the run out (seen on a loaded machine); the CLI's
    # exit tears the service down, which flushes it: do the same here, in the test's own process.
    wandb.teardown()
    run_files = list((tmp_path / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(run_files) == 1
    assert _run_record(run_files[0]) == ("advtrain-test", "g", "report")
    logged = {key: value for row in read_run(run_files[0])["history"] for key, value in row.items()}
    assert logged["report/_type"] == "table-file" and logged["report/nrows"] == 4
    assert logged["autoattack_vs_train_time/_type"] == "image-file"
    table = json.loads((run_files[0].parent / "files" / logged["report/path"]).read_text())
    assert table["columns"][:5] == ["method", "dataset", "arch", "runs", "clean_mean_pct"]
    assert [row[0] for row in table["data"]] == ["fgsm_rs", "pgd", "natural", "trades"]


def _run_record(path: Path) -> tuple[str, str, str]:
    from wandb.proto import wandb_internal_pb2 as pb

    for raw in _chunks(path):
        record = pb.Record()
        record.ParseFromString(raw)
        if record.WhichOneof("record_type") == "run":
            return record.run.project, record.run.run_group, record.run.job_type


def _write(folder: Path, method: str, seed: int, clean: float, time_s: float = 10.0, eps: float = 0.1,
           epochs: int = 2, n: int = 100, steps: int = 10, **extra) -> None:
    """A results.json as advtrain writes it, with the resolved config that defines its experiment."""
    folder.mkdir(parents=True)
    config = {"seed": seed, "dataset": {"name": "mnist", "eps": eps, "root": str(folder)},
              "arch": {"name": "mnist_net"}, "method": {"name": method, "steps": steps},
              "trainer": {"epochs": epochs, "batch_size": 128, "progress": "lines"}, "eval": {"n": n},
              "attack": {"pgd20": {"type": "pgd", "steps": 20}}, "logger": {"name": "none"}}
    results = {"kind": "train", "method": method, "dataset": "mnist", "arch": "mnist_net", "epochs": epochs,
               "seed": seed, "train_time_s": time_s, "passes_per_example": 11.0,
               "eval": {"n": n, "clean": clean, "pgd20": clean / 2}, "config": config,
               "checkpoint": str(folder / "checkpoints" / "last.pt"), **extra}
    (folder / "results.json").write_text(json.dumps(results))


def test_runs_of_different_settings_are_never_averaged_and_say_what_differs(tmp_path, capsys):
    _write(tmp_path / "a0", "gaat", 0, 0.90, eps=0.1, epochs=2, n=100)
    _write(tmp_path / "a1", "gaat", 1, 0.92, eps=0.1, epochs=2, n=100)  # another seed: averaged
    _write(tmp_path / "b0", "gaat", 0, 0.80, eps=0.3, epochs=10, n=1000)
    _write(tmp_path / "c0", "gaat", 0, 0.70, eps=0.1, epochs=2, n=100, steps=40)  # another method setting
    runs = collect(tmp_path)
    rows = aggregate(runs, metric_names(runs))
    rows = sorted(rows, key=lambda r: r.acc_pct["clean"][0])
    assert [r.runs for r in rows] == [1, 1, 2]
    assert [r.acc_pct["clean"][0] for r in rows] == pytest.approx([70.0, 80.0, 91.0])
    assert [r.differs for r in rows] == [
        "dataset.eps=0.1, eval.n=100, method.steps=40, trainer.epochs=2",
        "dataset.eps=0.3, eval.n=1000, method.steps=10, trainer.epochs=10",
        "dataset.eps=0.1, eval.n=100, method.steps=10, trainer.epochs=2",
    ]
    status, out, _ = report([tmp_path], capsys)
    assert status == 0 and "setting" in out and "dataset.eps=0.3" in out
    assert (tmp_path / "report.md").read_text().splitlines()[0].startswith("| method | dataset | arch | setting |")


def test_per_seed_gives_a_row_per_run_and_times_against_the_same_seeds_pgd(tmp_path, capsys):
    for seed, (pgd_time, gaat_time) in enumerate([(100.0, 20.0), (50.0, 20.0)]):
        _write(tmp_path / f"pgd{seed}", "pgd", seed, 0.9, time_s=pgd_time)
        _write(tmp_path / f"gaat{seed}", "gaat", seed, 0.8 + seed / 100, time_s=gaat_time)
    runs = collect(tmp_path)
    rows = {(r.method, r.differs): r for r in aggregate(runs, metric_names(runs), per_seed=True)}
    assert set(rows) == {(m, f"seed={s}") for m in ("pgd", "gaat") for s in (0, 1)}
    assert all(r.runs == 1 for r in rows.values())
    assert rows[("gaat", "seed=0")].acc_pct["clean"] == (80.0, None)
    assert rows[("gaat", "seed=1")].time_vs_pgd == pytest.approx(0.4)  # against seed 1's PGD-AT, not the mean
    status, out, _ = report([tmp_path, "--per-seed"], capsys)
    assert status == 0 and "seed=1" in out


def test_time_relative_to_pgd_only_against_pgd_of_the_same_setting(tmp_path):
    _write(tmp_path / "pgd_eps01", "pgd", 0, 0.9, time_s=100.0, eps=0.1)
    _write(tmp_path / "gaat_eps01", "gaat", 0, 0.9, time_s=20.0, eps=0.1)
    _write(tmp_path / "gaat_eps03", "gaat", 0, 0.8, time_s=30.0, eps=0.3)  # no PGD-AT at eps 0.3
    runs = collect(tmp_path)
    rows = {(r.method, r.differs): r for r in aggregate(runs, metric_names(runs))}
    assert rows[("gaat", "dataset.eps=0.1")].time_vs_pgd == pytest.approx(0.2)
    assert rows[("gaat", "dataset.eps=0.3")].time_vs_pgd is None
    assert rows[("pgd", "")].time_vs_pgd == 1.0


def test_several_pgd_runs_of_one_setting_give_no_ratio_until_baseline_picks_one(tmp_path, capsys):
    _write(tmp_path / "pgd10", "pgd", 0, 0.9, time_s=100.0, steps=10)
    _write(tmp_path / "pgd4", "pgd", 0, 0.9, time_s=40.0, steps=4)
    _write(tmp_path / "gaat", "gaat", 0, 0.9, time_s=20.0)
    status, out, err = report([tmp_path], capsys)
    assert status == 0 and "--baseline method.steps=10" in err  # says why the column is empty, and how to fill it
    assert all(line.endswith("|  |") for line in (tmp_path / "report.md").read_text().splitlines()[2:])

    status, out, err = report([tmp_path, "--baseline", "method.steps=4"], capsys)
    ratios = {line.split("|")[1].strip() + line.split("|")[4].strip(): line.split("|")[-2].strip()
              for line in (tmp_path / "report.md").read_text().splitlines()[2:]}
    assert status == 0 and err == ""
    assert ratios == {"gaat": "0.50", "pgdmethod.steps=10": "2.50", "pgdmethod.steps=4": "1.00"}

    for bad in ("method.steps=7", "steps=4"):
        status, _, err = report([tmp_path, "--baseline", bad], capsys)
        assert status == 2 and err.count("\n") == 1 and bad in err


def test_views_that_differ_in_cost_show_their_forward_flops(tmp_path, capsys):
    views = {"width=1,lambda=0": {"n": 100, "clean": 0.9, "pgd20": 0.1},
             "width=0.5,lambda=0": {"n": 100, "clean": 0.8, "pgd20": 0.1}}
    _write(tmp_path / "oats", "oats", 0, 0.9, views=views, flops={"width=1,lambda=0": 627_000,
                                                                    "width=0.5,lambda=0": 183_000})
    _write(tmp_path / "pgd", "pgd", 0, 0.9)
    status, out, _ = report([tmp_path], capsys)
    lines = (tmp_path / "report.md").read_text().splitlines()
    assert status == 0 and "forward MMAC" in lines[0]
    column = lines[0].split("|").index(" forward MMAC ")
    assert {line.split("|")[1].strip(): line.split("|")[column].strip() for line in lines[2:]} == {
        "oats [width=1,lambda=0]": "0.627", "oats [width=0.5,lambda=0]": "0.183", "pgd": ""}
    with (tmp_path / "report.csv").open() as f:
        assert sorted(r["forward_macs"] for r in csv.DictReader(f)) == ["", "183000", "627000"]


def test_an_evaluation_of_a_checkpoint_is_listed_apart_never_counted_as_a_run(tmp_path, capsys):
    _write(tmp_path / "train", "pgd", 0, 0.90)
    # advtrain-eval's record in its own folder, of the checkpoint trained above (an old one, without "kind")
    evaluation = tmp_path / "eval" / "2026-11-30"
    _write(evaluation, "pgd", 0, 0.10, checkpoint=str(tmp_path / "train" / "checkpoints" / "last.pt"))
    record = json.loads((evaluation / "results.json").read_text())
    del record["kind"]
    (evaluation / "results.json").write_text(json.dumps(record))
    status, out, _ = report([tmp_path], capsys)
    assert status == 0
    rows = list(csv.DictReader((tmp_path / "report.csv").open(newline="")))
    assert len(rows) == 1 and rows[0]["runs"] == "1" and float(rows[0]["clean_mean_pct"]) == pytest.approx(90.0)
    assert "1 evaluation of checkpoints" in out and str(tmp_path / "train") in out
    md = (tmp_path / "report.md").read_text()
    assert "Evaluations of checkpoints (advtrain-eval; not counted as runs above):" in md
    assert f"| pgd | mnist | mnist_net | 0 | {tmp_path / 'train'} | 100 | 10.00 | 5.00 |" in md


def test_the_plot_axis_stays_readable_when_runs_agree(tmp_path):
    from advtrain.report.plot import y_limits

    assert y_limits([50.0, 50.0]) == (45.0, 55.0)
    assert y_limits([99.5, 99.5]) == (90.0, 100.0) and y_limits([0.0]) == (0.0, 10.0)
    low, high = y_limits([10.0, 90.0])
    assert low < 10 and high > 90 and 0 <= low and high <= 100


def _tradeoff_run(folder: Path, method: str, arch: str, method_cfg: dict, eval_: dict, views=None,
                  attack: dict | None = None) -> None:
    folder.mkdir(parents=True)
    config = {"seed": 0, "dataset": {"name": "fashion_mnist", "eps": 0.1}, "arch": {"name": arch},
              "method": {"name": method, **method_cfg}, "trainer": {"epochs": 10}, "eval": {"n": 1000},
              **({"attack": attack} if attack else {})}
    results = {"kind": "train", "method": method, "dataset": "fashion_mnist", "arch": arch, "epochs": 10, "seed": 0,
               "train_time_s": 10.0, "passes_per_example": 9.0, "eval": eval_, "config": config,
               **({"views": views} if views else {})}
    (folder / "results.json").write_text(json.dumps(results))


def test_the_tradeoff_plot_sets_the_one_model_against_a_run_per_setting(tmp_path, capsys):
    from advtrain.report.plot import tradeoff_series

    acc = lambda clean, aa: {"n": 1000, "clean": clean, "autoattack": aa}  # noqa: E731
    views = {"lambda=0": acc(0.90, 0.10), "lambda=0.5": acc(0.88, 0.55), "lambda=1": acc(0.86, 0.64)}
    _tradeoff_run(tmp_path / "oat", "oat", "bn_cnn", {"lambdas": [0, 0.5, 1]}, views["lambda=0"], views)
    for i, (lam, clean, aa) in enumerate([(1.0, 0.83, 0.65), (0.0, 0.91, 0.0), (0.5, 0.87, 0.58)]):
        _tradeoff_run(tmp_path / "dedicated" / str(i), "pgd", "bn_cnn", {"adv_weight": lam}, acc(clean, aa))
    _tradeoff_run(tmp_path / "other_arch" / "0", "pgd", "mnist_net", {"adv_weight": 0.0}, acc(0.9, 0.0))
    _tradeoff_run(tmp_path / "other_arch" / "1", "pgd", "mnist_net", {"adv_weight": 1.0}, acc(0.8, 0.6))
    _tradeoff_run(tmp_path / "lone", "trades", "bn_cnn", {}, acc(0.85, 0.6))

    rows = aggregate(expand_views(collect(tmp_path)), ["clean", "autoattack"])
    one_model, dedicated = tradeoff_series(rows, "autoattack")  # no line for other arches or a lone run
    assert one_model.one_model and one_model.label == "oat (fashion_mnist / bn_cnn)"
    assert [p[2] for p in one_model.points] == ["lambda=0", "lambda=0.5", "lambda=1"]
    assert [v for p in one_model.points for v in p[:2]] == pytest.approx([90, 10, 88, 55, 86, 64])
    assert not dedicated.one_model and dedicated.label == "pgd, a run per method.adv_weight (fashion_mnist / bn_cnn)"
    assert [p[2] for p in dedicated.points] == ["0.0", "0.5", "1.0"]  # in the setting's order, not the folders'
    assert [v for p in dedicated.points for v in p[:2]] == pytest.approx([91, 0, 87, 58, 83, 65])

    status, _, err = report([tmp_path, "--out", tmp_path / "report"], capsys)
    assert status == 0, err
    assert (tmp_path / "report" / "report_views.png").stat().st_size > 10_000


def test_the_oats_views_plot_draws_a_line_per_width_and_names_what_it_measured(tmp_path):
    import matplotlib.pyplot as plt

    from advtrain.report.plot import runs_figure, scope, tradeoff_figure

    widths, lambdas = (1, 0.75, 0.5), (0, 0.1, 0.2, 0.3, 0.4, 1)
    views = {f"width={w:g},lambda={lam:g}": {"n": 1000, "clean": 0.85 + 0.04 * w - 0.03 * lam,
                                              "pgd20": 0.40 + 0.25 * lam + 0.05 * w}
             for w in widths for lam in lambdas}  # as OATS names them: full width first
    attack = {"pgd20": {"type": "pgd", "eps": 0.1, "norm": "linf", "steps": 20}}
    _tradeoff_run(tmp_path / "oats", "oats", "bn_cnn", {"widths": [0.5, 0.75, 1.0]}, views["width=1,lambda=0"],
                  views, attack)
    runs = expand_views(collect(tmp_path))
    fig = tradeoff_figure(aggregate(runs, metric_names(runs)), "pgd20")
    (ax,) = fig.axes
    lines = ax.get_lines()
    assert [line.get_label() for line in lines] == [f"oats, width={w} (fashion_mnist / bn_cnn)"
                                                    for w in ("0.5", "0.75", "1")]
    for line, w in zip(lines, ("0.5", "0.75", "1")):  # lambda along each line, in lambda's order
        assert list(line.get_ydata()) == pytest.approx([100 * views[f"width={w},lambda={lam:g}"]["pgd20"]
                                                        for lam in lambdas])
    title = ax.get_title()
    assert all(part in title for part in ("pgd20", "fashion_mnist", "L∞ ε = 0.1", "n = 1000")), title

    renderer = fig.canvas.get_renderer()
    labels = [(text.get_text(), text.get_window_extent(renderer)) for text in ax.texts]
    assert {"lambda=0", "lambda=1"} <= {name for name, _ in labels} <= {f"lambda={lam:g}" for lam in lambdas}
    assert not any(a.overlaps(b) for i, (_, a) in enumerate(labels) for _, b in labels[i + 1:])
    low, high = ax.get_ylim()  # pgd20 spans 42.5 to 70 %: the axis fits it, with a margin
    assert 35 < low < 42.5 and 70 < high < 77
    plt.close(fig)

    fig = runs_figure(runs, "pgd20")
    assert fig.axes[0].get_title() == ("pgd20 accuracy vs training time (1 run, a marker per view)\n"
                                       "fashion_mnist, L∞ ε = 0.1, n = 1000")
    plt.close(fig)
    cifar = {"attack.autoattack.eps": json.dumps(8 / 255), "attack.autoattack.norm": '"linf"'}
    assert scope([("cifar10", cifar, 10000)], "autoattack") == "cifar10, L∞ ε = 8/255, n = 10000"
    assert scope([("mnist", {"dataset.eps": "0.2"}, 100), ("mnist", {"dataset.eps": "0.3"}, 1000)],
                 "clean") == "mnist, ε = 0.2, 0.3, n = 100, 1000"
