"""Setting a training run up and closing it: command line, device, run directory, log, final tables.

Both training scripts start with `start` and `open_run` and end with `finish`; what happens between
is the training loop of train_uni.py.
"""
import argparse
import datetime
import os
import shutil
import sys
from pathlib import Path
from typing import Callable, Optional

import torch

from datasets import DatasetLayoutError, TestSet, TrainSet, check_images, class_folder, list_data
from models.registry import WeightsError, check_encoder_weights
from .checkpoint import CheckpointError, TrainingDiverged
from .config import (DEFAULTS, SCHEMA, ConfigError, build_parser, collect_overrides, config_from_args, dump, load_yaml,
                     parse_known, validate)
from .device import effective_precision, resolve_device
from .distributed import broadcast, init_distributed, is_main, shutdown, world_size
from .evaluation import EvaluationResult, format_markdown, write_tables
from .trackers import check_installed

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
RESUME_OVERRIDES = ("device", "num_workers", "data_path", "ckpt_every", "max_bad_steps", "spike_factor",
                    "spike_rollback", "logger")
# Mistakes a user can make (paths, values, files): reported as one line, never as a traceback.
USER_ERRORS = (CheckpointError, ConfigError, DatasetLayoutError, FileExistsError, FileNotFoundError, TrainingDiverged,
               WeightsError)


def run_cli(main: Callable[[list[str]], Optional[int]], argv: list[str], errors: tuple = ()) -> int:
    """Run a script's main; a user's mistake (USER_ERRORS, and the script's own `errors`) becomes one
    `error:` line on stderr and exit status 1, never a traceback."""
    try:
        return main(argv) or 0
    except (*USER_ERRORS, *errors) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1


class RunLog:
    """Prints a line and appends it to <run_dir>/log.txt (silent when not enabled: ranks other than 0)."""

    def __init__(self, run_dir: Path, enabled: bool = True):
        self.path = Path(run_dir) / "log.txt"
        self.enabled = enabled

    def __call__(self, message: str) -> None:
        if not self.enabled:
            return
        print(message, flush=True)
        with open(self.path, "a") as f:
            f.write(message + "\n")
            f.flush()
            os.fsync(f.fileno())


def output_folder(path, flag: str) -> Path:
    """A folder the user names for output; an existing file there is a one-line error, not a traceback."""
    path = Path(path)
    for parent in (path, *path.parents):
        if parent.exists():
            if not parent.is_dir():
                raise ConfigError(f"{flag} {path}: {parent} is a file, expected a folder")
            break
    return path


def create_run_dir(output_dir: str, run_name: str, overwrite: bool = False) -> Path:
    """A fresh run directory; an existing one is only reused with `overwrite` (its content is removed)."""
    run_dir = Path(output_dir) / run_name
    if run_dir.exists():
        if not overwrite:
            raise FileExistsError(f"run directory {run_dir} already exists; choose another --run_name, "
                                  f"continue it with --resume {run_dir}, or pass --overwrite to replace it")
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True)
    return run_dir


def default_run_name(cfg: dict, setting: str) -> str:
    """What was trained: <dataset>_<setting>[_<class>][_<encoder>]_<date>_<time>; the class when only one,
    the encoder when it is not the recipe's."""
    parts = [cfg["dataset"], setting]
    if cfg["classes"] and len(cfg["classes"]) == 1:
        parts.append(class_folder(cfg["classes"][0]))
    if cfg["encoder"] != DEFAULTS["encoder"]:
        parts.append(cfg["encoder"])
    return "_".join(parts + [f"{datetime.datetime.now():%Y%m%d_%H%M%S}"])


def parse_run_args(argv: list[str], default_config: str, description: str,
                   note: Callable[[str], None]) -> tuple[dict, argparse.Namespace]:
    """The config and options of a new run, or, with --resume, the run's own saved config.

    `--resume RUN_DIR` alone continues RUN_DIR. `--resume` added to the command that started the run
    continues <output_dir>/<run_name> of that command. Either way a value given here that differs from
    the saved one is refused (naming each key and both values), except those of RESUME_OVERRIDES."""
    parser = build_parser(str(CONFIGS / default_config), description, extra=[
        ("--overwrite", dict(action="store_true", help="replace an existing run directory")),
        ("--resume", dict(metavar="RUN_DIR", nargs="?", const="",
                          help="continue this run where it stopped (no value: the run this command names)"))])
    args = parse_known(parser, argv)
    setting = Path(default_config).stem.split("_")[-1]
    if args.resume is None:
        cfg = config_from_args(args)
        cfg["run_name"] = cfg["run_name"] or default_run_name(cfg, setting)
        return cfg, args
    explicit_config = any(a == "--config" or a.startswith("--config=") for a in argv)
    overrides = collect_overrides(args, SCHEMA)
    given = {**(config_from_args(args) if explicit_config else {}), **overrides}
    if not args.resume:
        if not given.get("run_name"):
            raise ConfigError("--resume without a RUN_DIR continues the run named by --run_name (and --output_dir); "
                              "give --run_name, or --resume RUN_DIR")
        args.resume = str(Path(given.get("output_dir", DEFAULTS["output_dir"])) / given["run_name"])
    saved_path = Path(args.resume) / "config.yaml"
    if not saved_path.is_file():
        raise FileNotFoundError(f"cannot resume: {saved_path} not found (is {args.resume} a run directory?)")
    saved = validate(load_yaml(saved_path), str(saved_path), note)
    changed = [key for key, value in given.items()
               if key not in RESUME_OVERRIDES and value != saved[key] and not (key == "run_name" and value is None)]
    if changed:
        raise ConfigError("; ".join(f"--{key} cannot change when resuming ({given[key]!r} given, {saved[key]!r} in "
                                    f"{saved_path})" for key in changed)
                          + f"; only {', '.join(RESUME_OVERRIDES)} can")
    resumed = {**saved, **{k: v for k, v in overrides.items() if k in RESUME_OVERRIDES}}
    return validate(resumed, str(saved_path), note=lambda _: None), args  # its notes were given just above


def start(argv: list[str], default_config: str, description: str
          ) -> tuple[dict, argparse.Namespace, torch.device, list[str]]:
    """Config, options and device of this process (under torchrun, every rank uses rank 0's run name),
    and the notes about the config that the run's log should carry."""
    notes = []
    cfg, args = parse_run_args(argv, default_config, description, notes.append)
    device = init_distributed(resolve_device(cfg["device"]))
    cfg["precision"] = effective_precision(cfg, device, notes.append)
    if cfg["batch_size"] % world_size():
        raise ConfigError(f"batch_size {cfg['batch_size']} is the global batch: it must be divisible by the "
                          f"{world_size()} processes of torchrun")
    output_folder(cfg["output_dir"], "--output_dir")
    check_installed(cfg["logger"])
    cfg["run_name"] = broadcast(cfg["run_name"])
    return cfg, args, device, notes


def load_run_data(cfg: dict, class_groups: list[list[str]]) -> list[tuple[TrainSet, dict[str, TestSet]]]:
    """The data of each group of classes (one model each), checked before a run directory exists and cheap
    checks first: the layout of every class, then the encoder weights (a missing, unreadable or mismatched
    file, or a failed download: the 350 MB download comes after a mistyped data_path is reported), then
    every image file."""
    data = [list_data(cfg, names) for names in class_groups]
    check_encoder_weights(cfg["encoder"], cfg["encoder_weights"], cfg["weights_dir"])
    for train_set, test_sets in data:
        check_images(cfg, train_set, test_sets)
    return data


def open_run(cfg: dict, args: argparse.Namespace, device: torch.device, notes: list[str]) -> tuple[Path, RunLog]:
    """Create the run directory (or reopen it with --resume), save the resolved config, start the log."""
    if args.resume or not is_main():
        run_dir = Path(args.resume or Path(cfg["output_dir"]) / cfg["run_name"])
        log = RunLog(run_dir, enabled=is_main())
        log(f"resuming run {run_dir} on {device}")
    else:
        run_dir = create_run_dir(cfg["output_dir"], cfg["run_name"], args.overwrite)
        log = RunLog(run_dir)
        (run_dir / "config.yaml").write_text(dump(cfg))
        log(f"config ({args.config} + command line):\n{dump(cfg)}")
        log(f"run directory: {run_dir}   device: {device}")
    for line in notes:
        log(line)
    return run_dir, log


def finish(run_dir: Path, result: EvaluationResult, log: RunLog, paper: Optional[dict] = None) -> None:
    """Rank 0 writes the tables (with `paper`, the paper's per-class numbers beside ours) and prints the
    per-class table; every process leaves the group."""
    if is_main():
        write_tables(run_dir, result, paper=paper)
        log("\n" + format_markdown(result.rows))
        log(f"results written to {run_dir}")
    shutdown()
