"""reproduce.py on a two-row tiny table: runs, resumes after an interruption without rerunning the
finished row, and writes our/paper/difference columns; every table under configs/tables is valid."""
import csv
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT, run_script, tiny_run_args
from reproduce import TABLES, load_table, slug
from test_reliability import wait_for

PAPER_A = [90.0, 91.0, 92.0, 93.0, 40.0, 41.0, 80.0]


@pytest.mark.parametrize("name", sorted(p.stem for p in TABLES.glob("*.yaml")))
def test_every_table_file_is_valid(name):
    table = load_table(name)
    assert table["rows"] and all(len(r["paper"]) == 7 for r in table["rows"])


def tiny_table(tmp_path: Path) -> Path:
    path = tmp_path / "tiny.yaml"
    path.write_text(
        "title: tiny\nscript: train_uni.py\nbase: mvtec_uni.yaml\nrows:\n"
        f"  - {{name: dropout 0.1, overrides: {{dropout: 0.1}}, paper: {PAPER_A}}}\n"
        "  - {name: jitter 5, overrides: {dropout: 0.0, feature_jitter: 5.0}, paper: [1, 2, 3, 4, 5, 6, 7],\n"
        "     ambiguous: test}\n"
        "  - {name: not yet, skip: not implemented, paper: [1, 2, 3, 4, 5, 6, 7]}\n"
        "  - {name: elsewhere, results_of: dropout 0.1, source: a fork, paper: [95.0, null, 1, 2, 3, 4, 5]}\n")
    return path


def passthrough(data, weights) -> list[str]:
    args = tiny_run_args(data, weights, "unused", total_iters=20, warmup_iters=2, ckpt_every=4, classes="stripes")
    return [a for i, a in enumerate(args) if not {a, args[i - 1] if i else ""} & {"--output_dir", "--run_name"}]


def test_reproduce_runs_resumes_and_writes_the_comparison(synthetic_data, tiny_weights, tmp_path):
    table = tiny_table(tmp_path)
    out = tmp_path / "out"
    argv = [str(ROOT / "reproduce.py"), str(table), "--out", str(out)] + passthrough(synthetic_data, tiny_weights)
    first = subprocess.Popen([sys.executable] + argv, cwd=ROOT, start_new_session=True,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    row_a, row_b = out / "tiny" / slug("dropout 0.1"), out / "tiny" / slug("jitter 5")
    wait_for(row_b / "checkpoint.pth", first, timeout=300)
    os.killpg(first.pid, signal.SIGTERM)  # the whole job: reproduce.py and the row it runs
    first.wait()
    assert (row_a / "results.csv").is_file() and not (row_b / "results.csv").is_file()
    finished_a = (row_a / "checkpoint.pth").stat().st_mtime_ns

    again = run_script("reproduce.py", argv[1:])
    assert "[dropout 0.1] finished earlier" in again.stdout and "[jitter 5] resuming" in again.stdout
    assert "[not yet] skipped: not implemented" in again.stdout
    assert (row_a / "checkpoint.pth").stat().st_mtime_ns == finished_a
    assert "resumed from" in (row_b / "log.txt").read_text()

    with open(out / "tiny" / "table.csv") as f:
        rows = {r["row"]: r for r in csv.DictReader(f)}
    ours = {r["class"]: r for r in csv.DictReader(open(row_a / "results.csv"))}["mean"]
    assert float(rows["dropout 0.1"]["I-AUROC ours"]) == pytest.approx(float(ours["I-AUROC"]), abs=0.005)
    assert float(rows["dropout 0.1"]["I-AUROC paper"]) == 90.0
    assert float(rows["dropout 0.1"]["I-AUROC diff"]) == pytest.approx(float(ours["I-AUROC"]) - 90.0, abs=0.01)
    assert rows["not yet"]["I-AUROC ours"] == "" and "not implemented" in rows["not yet"]["note"]
    other = rows["elsewhere"]  # the same run against a second source, which gives no I-AP
    assert other["I-AUROC ours"] == rows["dropout 0.1"]["I-AUROC ours"] and "source: a fork" in other["note"]
    assert other["I-AP paper"] == other["I-AP diff"] == "" and other["I-AP ours"] == rows["dropout 0.1"]["I-AP ours"]
    assert float(other["I-AUROC diff"]) == pytest.approx(float(ours["I-AUROC"]) - 95.0, abs=0.01)
    text = (out / "tiny" / "table.md").read_text()
    assert "| jitter 5 * |" in text and "ambiguous: test" in text
    assert (out / "tiny" / "table.png").stat().st_size > 1000

    commands = run_script("reproduce.py", [table, "--out", out, "--print_commands", "--gpus", "2", "--data_path", "X"])
    lines = commands.stdout.strip().splitlines()
    assert len(lines) == 2 and all(line.startswith("torchrun --nproc_per_node=2 ") for line in lines)
    assert "--feature_jitter 5.0" in lines[1] and "--data_path X" in lines[1]
