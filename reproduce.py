"""Reproduce one of the paper's tables: every row is a run of the training script with the row's config
overrides; the table shows our number, the paper's and the difference for each row and metric.

    python reproduce.py table4 --data_path ../mvtec_anomaly_detection          # runs the rows in turn
    python reproduce.py table4 --data_path ... --print_commands --gpus 4      # one command per row (SLURM array)
    python reproduce.py table4 --collect                                      # the table from finished runs
    python reproduce.py table4 --data_path demo --total_iters 50 --device cpu # any config key passes through

Tables live in configs/tables/<name>.yaml (or pass a path): a base setting, and rows of overrides with
the paper's seven numbers (null where the source gives none; `source:` names a source other than the
paper; `results_of: <row>` compares another row's run with a second source instead of training again). Runs go to <out>/<table>/<row>/ (default out: runs/tables). A finished row
(its results.csv exists) is skipped, an interrupted one is resumed, so the command can be stopped and
started again. The table is written as <out>/<table>/table.md, table.csv and table.png. Rows whose
configuration the paper leaves ambiguous are marked; rows we cannot run yet say why.
"""
import argparse
import contextlib
import csv
import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Optional

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import yaml  # noqa: E402

from train_advit import advit_keys  # noqa: E402
from utils.config import ConfigError, load_config, load_yaml, validate  # noqa: E402
from utils.curves import read_rows  # noqa: E402
from utils.metrics import METRIC_NAMES  # noqa: E402

ROOT = Path(__file__).resolve().parent
TABLES = ROOT / "configs" / "tables"


def load_table(name: str) -> dict:
    path = Path(name) if name.endswith(".yaml") else TABLES / f"{name}.yaml"
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in TABLES.glob("*.yaml")))
        raise ConfigError(f"table not found: {path} (tables: {known})")
    table = load_yaml(path)
    for row in table["rows"]:
        if len(row.get("paper", [])) != len(METRIC_NAMES):
            raise ConfigError(f"{path}: row '{row['name']}' needs the paper's {len(METRIC_NAMES)} numbers")
        if "results_of" in row and row["results_of"] not in {r["name"] for r in trained_rows(table)}:
            raise ConfigError(f"{path}: row '{row['name']}' has results_of '{row['results_of']}', not a trained row")
    for row in trained_rows(table):
        with script_keys(row_script(table, row)):
            base = load_config(ROOT / "configs" / row.get("base", table["base"]))
            validate({**base, **row["overrides"]}, f"{path}: row '{row['name']}'", note=lambda _: None)
    table["stem"] = path.stem
    return table


def row_script(table: dict, row: dict) -> str:
    """The row's training script: its own `script` (with its own `base`), else the table's."""
    return row.get("script", table["script"])


def script_keys(script: str):
    """While a row is validated, the keys its script's settings add (train_advit.py: ADViT's)."""
    return advit_keys() if script == "train_advit.py" else contextlib.nullcontext()


def slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9.+-]+", "_", name).strip("_")


def cli_value(value) -> str:
    return yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()


def row_command(table: dict, row: dict, out: Path, passthrough: list[str], gpus: int, resume: bool) -> list[str]:
    """The training command of one row, independent of every other row."""
    launcher = [sys.executable] if gpus <= 1 else ["torchrun", f"--nproc_per_node={gpus}"]
    command = launcher + [str(ROOT / row_script(table, row))]
    run_dir = out / table["stem"] / slug(row["name"])
    if resume:
        return command + ["--resume", str(run_dir)]
    command += ["--config", str(ROOT / "configs" / row.get("base", table["base"])), "--output_dir", str(run_dir.parent),
                "--run_name", run_dir.name]
    for key, value in row["overrides"].items():
        command += [f"--{key}", cli_value(value)]
    return command + passthrough


def row_state(run_dir: Path) -> str:
    if (run_dir / "results.csv").is_file():
        return "finished"
    return "interrupted" if (run_dir / "config.yaml").is_file() else "new"


def trained_rows(table: dict) -> list[dict]:
    """The rows that are runs of their own: not skipped, not another row's results."""
    return [row for row in table["rows"] if "skip" not in row and "results_of" not in row]


def run_rows(table: dict, out: Path, passthrough: list[str], gpus: int) -> None:
    for row in table["rows"]:
        run_dir = out / table["stem"] / slug(row["name"])
        if "results_of" in row:
            continue
        if "skip" in row:
            print(f"[{row['name']}] skipped: {row['skip']}", flush=True)
            continue
        state = row_state(run_dir)
        if state == "finished":
            print(f"[{row['name']}] finished earlier: {run_dir}", flush=True)
            continue
        command = row_command(table, row, out, passthrough, gpus, resume=state == "interrupted")
        print(f"[{row['name']}] {'resuming' if state == 'interrupted' else 'running'}: {shlex.join(command)}",
              flush=True)
        if subprocess.run(command, cwd=ROOT).returncode != 0:
            print(f"[{row['name']}] failed; the other rows go on", flush=True)


def cell(ours: Optional[float], paper: Optional[float]) -> list[str]:
    """ours, the published number and their difference as text; '-' for what is missing."""
    text = lambda value: "-" if value is None else f"{value:.2f}"
    return [text(ours), text(paper), "-" if ours is None or paper is None else f"{ours - paper:+.2f}"]


def mean_row(run_dir: Path) -> Optional[dict[str, Optional[float]]]:
    """The run's mean row (None: not run yet); an empty cell (masks: none) is None, shown as '-'."""
    rows = {r["class"]: r for r in read_rows(run_dir / "results.csv")}
    if "mean" not in rows:
        return None
    return {m: float(rows["mean"][m]) if rows["mean"][m] else None for m in METRIC_NAMES}  # "" = an empty cell


def collect(table: dict, out: Path) -> str:
    """table.md / table.csv / table.png: per row and metric, ours | paper | difference."""
    folder = out / table["stem"]
    folder.mkdir(parents=True, exist_ok=True)
    header = ["row"] + [f"{m} {kind}" for m in METRIC_NAMES for kind in ("ours", "paper", "diff")] + ["note"]
    lines = [f"# {table['title']}", "", "ours / paper (or the source a note names) / difference, mean over classes, in %", "",
             "| row | " + " | ".join(METRIC_NAMES) + " | note |", "|---" * (len(METRIC_NAMES) + 2) + "|"]
    records, chart = [], []
    for row in table["rows"]:
        ours = mean_row(folder / slug(row.get("results_of", row["name"])))
        notes = [row.get("skip"), "source: " + row["source"] if "source" in row else None,
                 "ambiguous: " + row["ambiguous"] if "ambiguous" in row else None,
                 "not run yet" if ours is None and not row.get("skip") else None]
        note = "; ".join(n for n in notes if n)
        cells, record = [], [row["name"]]
        for metric, paper in zip(METRIC_NAMES, row["paper"]):
            texts = cell(ours[metric] if ours else None, paper)
            cells.append(" / ".join(texts))
            record += [t if t != "-" else "" for t in texts]
        name = row["name"] + (" *" if "ambiguous" in row else "")
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {note} |")
        records.append(record + [note])
        chart.append((row["name"], ours, row["paper"]))
    lines += ["", "\\* the paper leaves this row's configuration ambiguous (see the note)."]
    text = "\n".join(lines) + "\n"
    (folder / "table.md").write_text(text)
    with open(folder / "table.csv", "w", newline="") as f:
        csv.writer(f).writerows([header] + records)
    plot_table(chart, table["title"], folder / "table.png")
    return text


def plot_table(chart: list, title: str, path: Path) -> None:
    """Ours against the paper for I-AUROC and P-AP, row by row."""
    fig, axes = plt.subplots(1, 2, figsize=(max(8.0, 1.1 * len(chart)), 4.5))
    for ax, metric in zip(axes, ("I-AUROC", "P-AP")):
        index = METRIC_NAMES.index(metric)
        xs = range(len(chart))
        ax.bar([x - 0.2 for x in xs], [paper[index] or 0 for _, _, paper in chart], 0.4, label="paper")
        ax.bar([x + 0.2 for x in xs], [(ours[metric] if ours else None) or 0 for _, ours, _ in chart], 0.4, label="ours")
        values = [v for _, ours, paper in chart for v in ([paper[index]] + ([ours[metric]] if ours else []))
                  if v is not None]
        if values:
            ax.set_ylim(min(values) - 2, max(values) + 1)
        ax.set_xticks(list(xs), [name for name, _, _ in chart], rotation=45, ha="right", fontsize=7)
        ax.set_title(metric)
        ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     allow_abbrev=False)
    parser.add_argument("table", help="a table name of configs/tables (table4, tableA5, ...) or a YAML path")
    parser.add_argument("--out", default="runs/tables", help="where the row runs and the table go")
    parser.add_argument("--gpus", type=int, default=1, help="processes per row (torchrun when > 1)")
    parser.add_argument("--print_commands", action="store_true", help="print one command per row and exit")
    parser.add_argument("--collect", action="store_true", help="only build the table from finished runs")
    args, passthrough = parser.parse_known_args(argv)
    table = load_table(args.table)
    out = Path(args.out).resolve()
    if args.print_commands:
        for row in trained_rows(table):
            print(shlex.join(row_command(table, row, out, passthrough, args.gpus, resume=False)))
        return
    if not args.collect:
        run_rows(table, out, passthrough, args.gpus)
    print(collect(table, out))


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except ConfigError as error:
        sys.exit(f"error: {error}")
