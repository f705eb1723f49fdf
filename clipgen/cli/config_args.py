"""Configs from the command line: `--config=FILE[:ARG]` with `--config.key=value`
overrides, checked against the locked config before anything heavy is imported."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

from clipgen.errors import InputError


def load_config(args: Sequence[str]):
    """The locked config from `--config=FILE[:ARG]` and its `--config.key=value` overrides.

    Unknown keys and sections, values of the wrong type and a missing or broken config
    file raise InputError naming the key or file.
    """
    args = _resolved_config_args(_joined(args))
    overrides = [arg for arg in args if arg.startswith("--config.")]
    files = [arg for arg in args if arg not in overrides]
    if len(files) != 1 or not files[0].startswith("--config="):
        raise InputError(
            f"expected one --config=FILE[:ARG] and --config.key=value overrides, got {files}"
        )
    spec = files[0].removeprefix("--config=")
    defaults = _read_config_file(spec)
    for arg in overrides:
        _check_key(defaults, arg.removeprefix("--config.").split("=")[0], spec)
    config = _apply_overrides(_read_config_file(spec), overrides)
    for arg in overrides:
        key = arg.removeprefix("--config.").split("=")[0]
        _check_type(key, _lookup(defaults, key), _lookup(config, key))
    config.lock()
    return config


def _joined(args: Sequence[str]) -> list[str]:
    """The arguments with `--config FILE` written as `--config=FILE`."""
    joined = []
    for arg in args:
        if joined and joined[-1] == "--config":
            joined[-1] = f"--config={arg}"
        else:
            joined.append(arg)
    return joined


def _read_config_file(spec: str):
    """`get_config(ARG)` of the config file FILE in `FILE[:ARG]`."""
    import importlib.util

    import ml_collections

    path, _, arg = spec.partition(":")
    if not Path(path).is_file():
        raise InputError(f"--config: no config file {path}; give configs/<stage>.py[:preset]")
    try:
        name = f"clipgen_config_{Path(path).stem}"
        module_spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[name] = module  # the file's dataclasses look their module up there
        module_spec.loader.exec_module(module)
        config = module.get_config(*([arg] if arg else []))
    except Exception as error:  # noqa: BLE001 - any failure of the user's config file
        raise InputError(
            f"--config {spec}: could not load it ({type(error).__name__}: {error})"
        ) from None
    if not isinstance(config, ml_collections.ConfigDict):
        raise InputError(f"--config {spec}: get_config returned {type(config).__name__}")
    return config


def _apply_overrides(config, overrides: Sequence[str]):
    from absl import flags
    from ml_collections import config_flags

    config.lock()
    flag_values = flags.FlagValues()
    argv = ["clipgen", *overrides]
    saved_argv = sys.argv
    sys.argv = argv  # config_flags reads the overrides from sys.argv
    try:
        config_flags.DEFINE_config_dict("config", config, flag_values=flag_values)
        flag_values(argv)
    except (AttributeError, KeyError) as error:  # a locked ConfigDict: no such key or section
        key = next((a.split("=")[0] for a in overrides), "")
        raise InputError(
            f"unknown config key {key}: {error.args[0]}; see the config file for its keys"
        ) from None
    except flags.Error as error:
        raise InputError(str(error).replace("\n", " ")) from None
    finally:
        sys.argv = saved_argv
    return flag_values.config


def _check_key(config, key: str, spec: str) -> None:
    import difflib

    import ml_collections

    node, path = config, []
    for part in key.split("."):
        if not isinstance(node, ml_collections.ConfigDict) or part not in node:
            where = f"config.{'.'.join(path)}" if path else "the config"
            known = sorted(node.keys()) if isinstance(node, ml_collections.ConfigDict) else []
            close = difflib.get_close_matches(part, known, n=1)
            hint = f'Did you mean "{close[0]}"? ' if close else ""
            raise InputError(
                f"--config.{key}: {where} of {spec} has no key {part!r}. {hint}"
                f"(it has: {', '.join(known) or 'no keys'})"
            )
        node, path = node[part], [*path, part]


def _lookup(config, key: str):
    for part in key.split("."):
        config = config[part]
    return config


def _check_type(key: str, default, value) -> None:
    """A tuple or list override must keep the element types of the preset's value (ints
    allowed for floats); the flag parser checks only the outer type."""
    if not isinstance(default, tuple | list) or not default:
        return
    kinds = {type(item) for item in default}
    allowed = kinds | ({int} if float in kinds else set())
    wrong = [item for item in value if type(item) not in allowed]
    if wrong:
        names = "/".join(sorted(kind.__name__ for kind in kinds))
        raise InputError(
            f"--config.{key}: {wrong[0]!r} is not a {names}; give e.g. "
            f"--config.{key}='{tuple(default)!r}'"
        )


def _resolved_config_args(args: Sequence[str]) -> list[str]:
    """The arguments with `--config=configs/<name>.py[:preset]` pointing at clipgen's own
    config file when there is no such file here (an installed clipgen run outside its
    checkout)."""
    resolved = list(args)
    for index, arg in enumerate(resolved):
        if not arg.startswith("--config="):
            continue
        path, colon, preset = arg.removeprefix("--config=").partition(":")
        if Path(path).exists() or Path(path).parent.name != "configs":
            continue
        from clipgen import config as config_lib

        try:
            resolved[index] = f"--config={config_lib.preset_path(Path(path).stem)}{colon}{preset}"
        except InputError:
            continue
    return resolved
