"""Compare finished runs at a glance: the config keys that differ, the metrics side by side, and the
loss curves overlaid.

    python compare_runs.py runs/mvtec_uni_a runs/mvtec_uni_b runs/mvtec_uni_c --out compare_ab
    python compare_runs.py runs/*dropout* --out dropout_ablation

Writes <out>/comparison.md (differing config keys, then the mean of every metric per run and the
per-class I-AUROC) and <out>/loss.png (every run's train_steps.csv; separated runs: one curve per class).
"""
import argparse
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import yaml  # noqa: E402

from utils.config import fill_defaults  # noqa: E402
from utils.curves import read_rows  # noqa: E402
from utils.evaluation import TABLE_COLUMNS  # noqa: E402


def load_run(run_dir: Path) -> tuple[dict, dict[str, dict[str, str]]]:
    """The run's config and its results table (class -> column -> value in percent)."""
    for name in ("config.yaml", "results.csv"):
        if not (run_dir / name).is_file():
            raise FileNotFoundError(f"{run_dir} is not a finished run: {run_dir / name} is missing")
    table = {row["class"]: row for row in read_rows(run_dir / "results.csv")}
    config = fill_defaults(yaml.safe_load((run_dir / "config.yaml").read_text()), str(run_dir), note=lambda _: None)
    return config, table


def two_decimals(cell: str) -> str:
    """A results.csv cell for the table; an empty one (not computed: masks none) stays empty."""
    return f"{float(cell):.2f}" if cell else ""


def differing_keys(configs: list[dict]) -> list[str]:
    keys = sorted(set().union(*configs) - {"run_name", "output_dir"})
    return [k for k in keys if len({repr(c.get(k)) for c in configs}) > 1]


def markdown(names: list[str], configs: list[dict], tables: list[dict]) -> str:
    lines = ["## Config keys that differ", ""]
    keys = differing_keys(configs)
    if keys:
        lines += ["| run | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
        lines += [f"| {n} | " + " | ".join(str(c.get(k)) for k in keys) + " |" for n, c in zip(names, configs)]
    else:
        lines.append("(none besides run_name and output_dir)")
    lines += ["", "## Mean over classes", "", "| run | " + " | ".join(TABLE_COLUMNS) + " |",
              "|---" * (len(TABLE_COLUMNS) + 1) + "|"]
    lines += [f"| {n} | " + " | ".join(two_decimals(t["mean"][k]) for k in TABLE_COLUMNS) + " |"
              for n, t in zip(names, tables)]
    classes = [c for c in tables[0] if c != "mean"]
    lines += ["", "## I-AUROC per class", "", "| class | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    lines += [f"| {c} | " + " | ".join(two_decimals(t[c]["I-AUROC"]) if c in t else "" for t in tables) + " |"
              for c in classes]
    return "\n".join(lines) + "\n"


def plot_losses(names: list[str], run_dirs: list[Path], path: Path) -> None:
    fig, ax = plt.subplots(figsize=(9, 5))
    for name, run_dir in zip(names, run_dirs):
        for csv_path in [run_dir / "train_steps.csv"] + sorted(run_dir.glob("*/train_steps.csv")):
            rows = read_rows(csv_path)
            if rows:
                label = name if csv_path.parent == run_dir else f"{name}/{csv_path.parent.name}"
                ax.plot([int(r["step"]) for r in rows], [float(r["loss"]) for r in rows], lw=0.8, label=label)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_yscale("log")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dirs", nargs="+", help="finished run directories")
    parser.add_argument("--out", required=True, help="folder for comparison.md and loss.png")
    args = parser.parse_args(argv)
    run_dirs = [Path(d) for d in args.run_dirs]
    runs = [load_run(d) for d in run_dirs]
    names = [d.name for d in run_dirs]
    if len(set(names)) < len(names):
        names = [str(d) for d in run_dirs]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    text = markdown(names, [c for c, _ in runs], [t for _, t in runs])
    (out / "comparison.md").write_text(text)
    plot_losses(names, run_dirs, out / "loss.png")
    print(text + f"\nwritten to {out / 'comparison.md'} and {out / 'loss.png'}")


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except FileNotFoundError as error:
        sys.exit(f"error: {error}")
