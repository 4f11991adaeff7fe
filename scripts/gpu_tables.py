#!/usr/bin/env python
"""Markdown tables from scripts/gpu_check.py's JSON, for gpu_check.md and for docs/performance.md.

    python scripts/gpu_tables.py docs/bench/gpu_check.json                                # print the tables
    python scripts/gpu_tables.py docs/bench/gpu_check.json --update docs/performance.md   # replace them there

--update rewrites only what lies between the lines `<!-- gpu_check:begin -->` and `<!-- gpu_check:end -->`, so the
GPU numbers in the docs are always this script's output, never typed by hand.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

BEGIN, END = "<!-- gpu_check:begin -->", "<!-- gpu_check:end -->"


def _f(value, spec: str, none: str = "–") -> str:
    return none if value is None else format(value, spec)


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
            *["| " + " | ".join(r) + " |" for r in rows], ""]


def _split(row: dict) -> str:
    if row.get("attack_share") is None:
        return "–"
    return f"{row['attack_share']:.0%} \\| {row['update_share']:.0%}"


def _bench_rows(result: dict, first: str) -> list[str]:
    rows = []
    for r in result["rows"]:
        if r.get("error"):
            rows.append([r["name"], f"failed: {r['error']}", *["" for _ in range(8)]])
            continue
        rows.append([r["name"], _f(r["images_per_s"], ".0f"), _f(r["spread"], ".0%"), _f(r["vs_fast_path"], ".2f"),
                     _f(r["passes_per_example"], ".2f"), _split(r), _f(r["peak_memory_mib"], ".0f"),
                     _f(r["matrix_tflops"], ".3g"), _f(r["of_matrix_rate"], ".1%"),
                     _f(r["host_syncs_per_step"], ".1f")])
    return _table(["row", "img/s", "± spread", f"× {first}", "passes/ex", "attack \\| update", "peak MiB",
                   "TFLOP/s", "of matmul rate", "syncs/step"], rows)


def _bench_header(result: dict) -> str:
    return (f"{result['method']} · {result['arch']} · {'×'.join(map(str, result['shape']))} · batch "
            f"{result['batch_size']} · {result['precision']}, channels_last {str(result['channels_last']).lower()} "
            f"· {result['repeats']} windows of {result['steps']} steps · matmul rate measured in the same process "
            f"{result['matrix_rate_tflops']:.4g} TFLOP/s ({result['matrix_dtype']}) · "
            f"{result['flops_per_image'] / 1e9:.3g} GFLOP per image per step")


def _status(step: dict) -> list[str]:
    if step["status"] == "ok":
        return []
    return [f"**{step['status']}**: {step['error']}", ""]


def _ceilings(step: dict) -> list[str]:
    r = step["result"]
    return _table(["device", "bf16 matmul TFLOP/s", "fp32 matmul TFLOP/s", "copy GB/s (read + write)"],
                  [[r["device"], _f(r["bf16_matmul_tflops"], ".4g"), _f(r["fp32_matmul_tflops"], ".4g"),
                    _f(r["copy_gb_per_s"], ".4g")]]) + \
        [f"{r['matmul_n']}³ matmuls on random data, {r['matmul_reps']} timed together (CUDA events on a GPU); "
         f"a {r['copy_mib']} MiB device-to-device copy.", ""]


def _bench(step: dict, first: str = "fast path") -> list[str]:
    r = step["result"]
    lines = [_bench_header(r), "", *_bench_rows(r, first)]
    if r.get("speedup_vs_reference"):
        lines += [f"advtrain / reference: **{r['speedup_vs_reference']:.2f}×** the images per second.", ""]
    return lines


def _costs(step: dict) -> list[str]:
    r = step["result"]
    rows = []
    for row in r["rows"]:
        if row.get("error"):
            rows.append([row["name"], f"failed: {row['error']}", "", "", ""])
            continue
        rows.append([row["name"], _f(row["images_per_s"], ".0f"), _f(row["passes_per_example"], ".2f"),
                     _f(1 / row["vs_fast_path"] if row.get("vs_fast_path") else None, ".2f"),
                     _f(row["of_matrix_rate"], ".1%")])
    first = r["rows"][0]["name"]
    return [f"{r['arch']} · {'×'.join(map(str, r['shape']))} · batch {r['batch_size']} · {r['precision']} · "
            f"{r['repeats']} windows of {r['steps']} steps, rows taking turns", "",
            *_table(["method", "img/s", "passes/ex", f"epoch time / {first}", "of matmul rate"], rows)]


def _e2e(step: dict, commands: list[dict]) -> list[str]:
    rows = []
    for (name, r), cmd in zip(step["result"].items(), commands):
        failed = [k for k, ok in r["checks"].items() if not ok]
        rows.append([name, _f(r.get("train_time_s"), ".1f"), _f(r.get("images_per_s"), ".0f"),
                     _f(r.get("clean"), ".1%"), _f(r.get("pgd20"), ".1%"), _f(r.get("autoattack"), ".1%"),
                     _f(r.get("n"), "d"), "all pass" if not failed else "failed: " + "; ".join(failed)])
    lines = _table(["launch", "train s", "train img/s", "clean", "PGD-20", "AutoAttack", "n", "checks"], rows)
    return lines + [f"`{c['command']}`" + "  " for c in commands] + [""]


def _profile(step: dict) -> list[str]:
    r = step["result"]
    rows = [[f"`{t['name'][:90]}`", _f(t["ms_per_step"], ".3f"), _f(t["share"], ".1%"), _f(t["calls_per_step"], ".0f")]
            for t in r["top"]]
    return [f"{r['clock']}: {r['kernel_ms_per_step']:.3g} ms of kernels in {r['wall_ms_per_step']:.3g} ms per step "
            f"under the profiler (busy {r['busy']:.0%}).", "",
            *_table(["kernel", "ms / step", "share", "calls / step"], rows)]


def _targets(summary: dict) -> list[str]:
    if not summary:
        return []
    m, t, ok = summary["measured"], summary["targets"], summary["met"]
    mark = {True: "met", False: "**missed**", None: "not measured"}
    return _table(["target (PGD-10, PreActResNet-18, batch 512)", "goal", "measured", ""], [
        ["share of the bf16 matmul rate", f"≥ {t['of_matrix_rate']:.0%}", _f(m["of_matrix_rate"], ".1%"),
         mark[ok["of_matrix_rate"]]],
        ["throughput over the papers' loop", f"≥ {t['speedup_vs_reference']:.0f}×",
         _f(m["speedup_vs_reference"], ".2f") + "×", mark[ok["speedup_vs_reference"]]],
        ["host-device syncs inside a step", "0", _f(m["host_syncs_per_step"], ".1f"), mark[ok["host_syncs_per_step"]]],
    ])


SECTIONS = {
    "ceilings": _ceilings,
    "pgd10": _bench,
    "wrn": _bench,
    "costs": _costs,
    "profile": _profile,
    "compile": _bench,
}


def render(report: dict, level: int = 3) -> str:
    """All of a gpu_check report's tables as Markdown; `level`: the heading level of each step."""
    env = report["environment"]
    lines = [f"{'GPU check' if not report['smoke'] else 'GPU check (smoke: toy sizes on the CPU)'}: "
             f"{env.get('gpu') or 'no GPU'}, driver {env.get('driver') or '–'}, torch {env['torch']}, CUDA "
             f"{env.get('cuda') or '–'}, cuDNN {env.get('cudnn') or '–'}, Python {env['python']}, advtrain commit "
             f"{env.get('advtrain_commit') or '–'}; {report['started']}, {report['wall_s']:.0f} s in all "
             f"(budget {report['budget_s']:.0f} s).", ""]
    lines += _targets(report.get("summary") or {})
    for name, step in report["steps"].items():
        lines += [f"{'#' * level} {name}: {step['title']}", "", *_status(step)]
        if step.get("result"):
            lines += _e2e(step, step["commands"]) if name == "e2e" else SECTIONS[name](step)
        if name != "e2e":
            lines += [f"`{c['command']}`" + ("" if c["status"] == "ok" else f" ({c['status']})")
                      for c in step["commands"]] + [""]
    return "\n".join(lines).rstrip() + "\n"


def update(doc: Path, tables: str) -> None:
    text = doc.read_text()
    if BEGIN not in text or END not in text:
        raise SystemExit(f"gpu_tables: {doc} has no {BEGIN} ... {END} block to replace")
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    doc.write_text(f"{head}{BEGIN}\n{tables}{END}{tail}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("json", type=Path, help="gpu_check.json")
    parser.add_argument("--update", type=Path, metavar="DOC", help="replace the tables between the markers in DOC")
    parser.add_argument("--level", type=int, default=4, help="heading level of each step (default 4)")
    opts = parser.parse_args(argv)
    tables = render(json.loads(opts.json.read_text()), opts.level)
    if opts.update:
        update(opts.update, tables)
    else:
        print(tables, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
