"""Configuration: one base file holds every key; a setting names its parent and holds what differs.

    configs/base.yaml          every key with its recipe value and a one-line comment
    configs/visa_sep.yaml      _base_: mvtec_sep.yaml, then only the keys that differ
    --key value                command-line overrides on top

The type of each key is the type of its value in base.yaml (`NULL_DEFAULT_TYPES` covers keys whose
default is null). A config is validated before any work starts: an unknown key (with the closest
valid name), a wrong type or an out-of-range value is a one-line error; a key that an older config or
checkpoint lacks gets its default and a note.
"""
import argparse
import contextlib
import difflib
import sys
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Union, get_args, get_origin

import yaml

from models.dinomaly import check_architecture
from models.registry import ENCODERS, default_target_layers

BASE_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "base.yaml"
PARENT_KEY = "_base_"


class ConfigError(ValueError):
    pass


def load_yaml(path: Union[str, Path]) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        cfg = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: not valid YAML: {error}") from None
    if not isinstance(cfg, dict):
        raise ConfigError(f"{path}: expected a mapping of config keys, got {type(cfg).__name__}")
    return cfg


def _infer_type(key: str, value: Any) -> Any:
    if value is None:
        return NULL_DEFAULT_TYPES.get(key, Optional[str])
    if isinstance(value, list):
        return list[_infer_type(key, value[0])] if value else list[int]
    return type(value)


AUTO = "auto"  # a value resolved from the encoder when the config is validated
NULL_DEFAULT_TYPES = {"classes": Optional[list[str]], "bottleneck_first_lr": Optional[float],
                      "logger": Optional[list[str]]}
TYPE_OVERRIDES = {"target_layers": Union[list[int], str]}  # a list, or AUTO
DEFAULTS: dict[str, Any] = load_yaml(BASE_CONFIG)
SCHEMA: dict[str, Any] = {key: TYPE_OVERRIDES.get(key) or _infer_type(key, value) for key, value in DEFAULTS.items()}

CHOICES = {
    "dataset": ("mvtec", "visa", "mpdd", "btad", "miad", "unimedical", "realiad", "realiad_variety", "manta", "mulsen",
                "mvtec3d", "folder"),
    "modality": ("rgb", "rgbd"),
    "attention": ("linear", "softmax", "conv"),
    "sampler": ("uniform", "class_balanced"),
    "check_images": ("full", "header"),
    "input_norm": ("imagenet", "encoder"),
    "fuse_mode": ("mean", "concat"),
    "bottleneck": ("mlp", "two_stage"),
    "lr_schedule": ("v1", "v2"),
    "train_augment": ("none", "strong"),
    "realiad_split": ("mv", "sv"),
    "realiad_maskless": ("error", "normal"),
    "masks": ("required", "none"),
    "precision": ("fp32", "bf16", "fp16"),
    "image_cache": ("none", "memory", "disk"),
    "cache_features": ("none", "memory", "disk"),
    "logger": ("tensorboard", "wandb", "mlflow"),  # each item of the list
}
POSITIVE = ("image_size", "crop_size", "batch_size", "decoder_depth", "total_iters", "lr", "conv_kernel",
            "bottleneck_width", "bottleneck_first_lr",
            "aupro_thresholds", "map_size", "grad_clip", "max_bad_steps")
NON_NEGATIVE = ("num_workers", "warmup_iters", "final_lr", "weight_decay", "eps", "hm_factor", "hm_ramp_iters",
                "eval_every", "attn_eps", "feature_jitter", "neighbor_mask", "max_ratio", "map_sigma", "ckpt_every", "shots",
                "spike_factor")
ARCHITECTURE_KEYS = ("target_layers", "fuse_layer_encoder", "fuse_layer_decoder", "decoder_depth", "fuse_mode",
                     "recenter", "attention", "neighbor_mask", "conv_kernel")  # checked by models.check_architecture
UNIT_INTERVAL = ("dropout", "hm_p_final", "gt_threshold", "aupro_fpr_limit")
CLOSED_UNIT_INTERVAL = ("rgb_ratio",)



def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _matches(value: Any, tp: Any) -> bool:
    origin = get_origin(tp)
    if origin is Union:
        return any(_matches(value, arg) for arg in get_args(tp))
    if origin is list:
        return isinstance(value, list) and all(_matches(v, get_args(tp)[0]) for v in value)
    if tp is type(None):
        return value is None
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, tp)


def _parse_cli_value(text: str, tp: Any) -> Any:
    """Command-line text -> value: YAML syntax, plus '1e-4' as a float and 'a,b,c' as a list."""
    if text == AUTO and _matches(AUTO, tp):
        return AUTO
    base = [a for a in get_args(tp) if a is not type(None)][0] if get_origin(tp) is Union else tp
    if text.lower() in ("null", "none") and base is not tp:
        return None
    if base is str:
        return text
    if base is float:
        try:
            return float(text)
        except ValueError:
            pass
    value = yaml.safe_load(text)
    if get_origin(base) is list and not isinstance(value, list):
        value = [yaml.safe_load(part) for part in str(text).split(",")] if text else []
    return value


def _check(cfg: dict[str, Any], source: str) -> None:
    for key, value in cfg.items():
        if key not in SCHEMA:
            close = difflib.get_close_matches(key, SCHEMA, n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            raise ConfigError(f"{source}: unknown config key '{key}'{hint}")
        if not _matches(value, SCHEMA[key]):
            raise ConfigError(f"{source}: '{key}' must be {_type_name(SCHEMA[key])}, got {value!r}")
        if isinstance(value, str) and key in TYPE_OVERRIDES and value != AUTO:
            raise ConfigError(f"{source}: '{key}' must be a list or '{AUTO}', got '{value}'")
        for item in (value if isinstance(value, list) else [value]) if key in CHOICES and value is not None else []:
            if item not in CHOICES[key]:
                raise ConfigError(f"{source}: '{key}' must be one of {', '.join(CHOICES[key])}, got '{item}'")
        if key in POSITIVE and value is not None and value <= 0:
            raise ConfigError(f"{source}: '{key}' must be > 0, got {value}")
        if key in NON_NEGATIVE and value < 0:
            raise ConfigError(f"{source}: '{key}' must be >= 0, got {value}")
        if key in UNIT_INTERVAL and not 0 <= value < 1:
            raise ConfigError(f"{source}: '{key}' must be in [0, 1), got {value}")
        if key in CLOSED_UNIT_INTERVAL and not 0 <= value <= 1:
            raise ConfigError(f"{source}: '{key}' must be in [0, 1], got {value}")


def fill_defaults(cfg: dict[str, Any], source: str, note: Callable[[str], None] = print) -> dict[str, Any]:
    """Keys added after `cfg` was written (an older config or checkpoint) take their base value."""
    missing = [key for key in DEFAULTS if key not in cfg]
    if missing:
        note(f"note: {source} has no {', '.join(missing)}; using the default"
             f"{'s' if len(missing) > 1 else ''} of configs/base.yaml: "
             + ", ".join(f"{key}={DEFAULTS[key]!r}" for key in missing))
    return {**DEFAULTS, **cfg}


def validate(cfg: dict[str, Any], source: str = "config", note: Callable[[str], None] = print) -> dict[str, Any]:
    """The complete, checked config: unknown keys and bad values are a ConfigError naming the key."""
    _check(cfg, source)
    cfg = fill_defaults(cfg, source, note)
    if cfg["crop_size"] > cfg["image_size"]:
        raise ConfigError(f"{source}: crop_size {cfg['crop_size']} is larger than image_size {cfg['image_size']}")
    patch_size = encoder_patch_size(cfg["encoder"], source)
    if cfg["crop_size"] % patch_size:
        hint = " (the paper runs 16-pixel encoders at --image_size 512 --crop_size 448)" if patch_size == 16 else ""
        raise ConfigError(f"{source}: crop_size must be a multiple of the patch size {patch_size} of encoder "
                          f"'{cfg['encoder']}', got {cfg['crop_size']}{hint}")
    if cfg["target_layers"] == AUTO:
        cfg["target_layers"] = default_target_layers(ENCODERS[cfg["encoder"]].depth)
    try:  # what the model's constructor would refuse, from the encoder's depth in the registry
        check_architecture(ENCODERS[cfg["encoder"]].depth, **{key: cfg[key] for key in ARCHITECTURE_KEYS})
    except ValueError as error:
        raise ConfigError(f"{source}: {error}") from None
    for key, needs, why in (("bottleneck_first_lr", cfg["bottleneck"] == "two_stage", "needs --bottleneck two_stage"),
                            ("train_augment", cfg["cache_features"] == "none", "strong changes the features at "
                                                                              "every step: use cache_features none"),
                            *((key, cfg["dataset"] != "manta", "cannot cache MANTA-Tiny: a training image is a view "
                               "drawn at random from its file at every read") for key in ("image_cache", "cache_features")),
                            ("realiad_images", cfg["dataset"] in ("realiad", "realiad_variety"), "needs a Real-IAD dataset"),
                            *((key, cfg["dataset"] != "mulsen", "draws single images; MulSen-AD trains on RGB-infrared "
                               "pairs") for key in ("shots", "shot_list")),
                            ("train_augment", cfg["modality"] == "rgb", "draws crops and turns per image, so RGB and "
                             "depth would disagree: use train_augment none with modality rgbd"),
                            ("image_cache", cfg["dataset"] != "mvtec3d", "cannot cache MVTec 3D-AD: its depth rendering "
                             "and masking happen before the resize (cache_features works)")):
        if cfg[key] not in (None, False, "none") and not needs:
            raise ConfigError(f"{source}: {key} {cfg[key]!r} {why}")
    if cfg["modality"] == "rgbd" and cfg["dataset"] != "mvtec3d":
        raise ConfigError(f"{source}: modality rgbd needs dataset mvtec3d (RGB images with depth maps), "
                          f"got dataset {cfg['dataset']}")
    if cfg["masks"] == "none" and cfg["dataset"] in ("realiad", "realiad_variety", "manta"):
        raise ConfigError(f"{source}: masks 'none' needs a dataset in the MVTec layout; {cfg['dataset']} reads its "
                          "labels from its masks or JSON files" + (" (see realiad_maskless)" if "realiad" in
                                                                   cfg["dataset"] else ""))
    if cfg["realiad_split"] != "mv" and cfg["dataset"] == "realiad_variety":
        raise ConfigError(f"{source}: realiad_split {cfg['realiad_split']!r}: Real-IAD Variety has one split (mv)")
    if cfg["dataset"] == "mulsen" and cfg["batch_size"] % 2:
        raise ConfigError(f"{source}: batch_size {cfg['batch_size']} must be even for MulSen-AD: half RGB, half "
                          "infrared images of the same objects")
    if cfg["warmup_iters"] >= cfg["total_iters"]:
        raise ConfigError(f"{source}: warmup_iters ({cfg['warmup_iters']}) must be below total_iters "
                          f"({cfg['total_iters']})")
    if len(cfg["betas"]) != 2 or not all(0 <= b < 1 for b in cfg["betas"]):
        raise ConfigError(f"{source}: betas must be two values in [0, 1), got {cfg['betas']}")
    return cfg


def encoder_patch_size(name: str, source: str) -> int:
    """The patch size of a registered encoder; an unknown name names the closest registered one."""
    if name not in ENCODERS:
        close = difflib.get_close_matches(name, ENCODERS, n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        raise ConfigError(f"{source}: unknown encoder '{name}'{hint} (registered: {', '.join(ENCODERS)})")
    return ENCODERS[name].patch_size


def load_config(path: Union[str, Path], _children: tuple[Path, ...] = ()) -> dict[str, Any]:
    """A setting file with its chain of `_base_` parents merged (child keys win), not yet validated."""
    path = Path(path).resolve()
    if path in _children:
        raise ConfigError(f"{path}: the chain of {PARENT_KEY} parents loops back to this file")
    cfg = load_yaml(path)
    _check({k: v for k, v in cfg.items() if k != PARENT_KEY}, str(path))
    parent = cfg.pop(PARENT_KEY, None)
    if parent is None:
        return cfg
    if not isinstance(parent, str):
        raise ConfigError(f"{path}: {PARENT_KEY} must be the file name of the parent config, got {parent!r}")
    parent_path = path.parent / parent
    if not parent_path.is_file():
        raise ConfigError(f"{path}: parent config {PARENT_KEY}: {parent} not found at {parent_path}")
    return {**load_config(parent_path, (*_children, path)), **cfg}


def add_config_flags(parser: argparse.ArgumentParser, keys: Iterable[str]) -> None:
    for key in keys:
        parser.add_argument(f"--{key}", type=str, default=None, metavar=_type_name(SCHEMA[key]).upper())


def collect_overrides(args: argparse.Namespace, keys: Iterable[str]) -> dict[str, Any]:
    """The config values given on the command line, parsed to their schema types."""
    return {key: _parse_cli_value(getattr(args, key), SCHEMA[key]) for key in keys if getattr(args, key) is not None}


def parse_known(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    """Parse, turning an unknown option into an error that names the closest valid one."""
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        flag = unknown[0]
        options = [o.lstrip("-") for o in parser._option_string_actions if o.startswith("--")]
        close = difflib.get_close_matches(flag.lstrip("-"), options, n=1)
        hint = f"; did you mean '--{close[0]}'?" if close else ""
        print(f"error: unknown option '{flag}'{hint} (see --help)", file=sys.stderr)
        sys.exit(2)
    return args


def build_parser(default_config: str, description: str,
                 extra: Optional[list[tuple[str, dict]]] = None) -> argparse.ArgumentParser:
    """`--config FILE`, every config key as `--key value`, and the script's own options `extra`."""
    parser = argparse.ArgumentParser(description=description, allow_abbrev=False,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=default_config, help="YAML file with the recipe")
    for flag, kwargs in extra or []:
        parser.add_argument(flag, **kwargs)
    add_config_flags(parser, SCHEMA)
    return parser


def config_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """The YAML file of `--config` with the command-line overrides applied, validated."""
    cfg = load_config(args.config)
    cfg.update(collect_overrides(args, SCHEMA))
    return validate(cfg, f"{args.config} + command line")


def parse_args(argv: list[str], default_config: str, description: str,
               extra: Optional[list[tuple[str, dict]]] = None) -> tuple[dict[str, Any], argparse.Namespace]:
    """Read `--config FILE` (default `default_config`), then apply every `--key value` override."""
    args = parse_known(build_parser(default_config, description, extra), argv)
    return config_from_args(args), args


def dump(cfg: dict[str, Any]) -> str:
    return yaml.safe_dump(cfg, sort_keys=False, default_flow_style=None, width=120)


@contextlib.contextmanager
def settings_keys(path: Union[str, Path], choices: Optional[dict[str, tuple]] = None):
    """While inside, the keys of another model's settings file (configs/advit/base.yaml) are valid too and
    its values are the defaults; on leaving, Dinomaly's schema and defaults are exactly as they were, so
    Dinomaly's configs never see these keys."""
    extra = {k: v for k, v in load_yaml(path).items() if k != PARENT_KEY}
    saved = dict(DEFAULTS), dict(SCHEMA), dict(CHOICES)
    SCHEMA.update({key: _infer_type(key, value) for key, value in extra.items() if key not in SCHEMA})
    DEFAULTS.update(extra)
    CHOICES.update(choices or {})
    try:
        yield
    finally:
        for table, before in zip((DEFAULTS, SCHEMA, CHOICES), saved):
            table.clear()
            table.update(before)
