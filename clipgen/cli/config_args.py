"""Configs from the command line: `--config=FILE[:ARG]` with `--config.key=value`
overrides, checked against the locked config before anything heavy is imported."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path


def load_config(args: Sequence[str]):
    """The locked config from `--config=FILE[:ARG]` and its `--config.key=value` overrides.

    Unknown keys and values of the wrong type raise ValueError naming the key.
    """
    import ml_collections
    from absl import flags
    from ml_collections import config_flags

    args = _resolved_config_args(args)
    flag_values = flags.FlagValues()
    config_flags.DEFINE_config_file(
        "config", None, "the stage config file", flag_values=flag_values, lock_config=True
    )
    argv = ["clipgen-train", *args]
    saved_argv = sys.argv
    sys.argv = argv  # config_flags reads the overrides from sys.argv
    try:
        flag_values(argv)
    except AttributeError as error:  # a locked ConfigDict rejecting an unknown key
        key = next((a.split("=")[0] for a in args if a.startswith("--config.")), "")
        raise ValueError(f"unknown config key in {key}: {error.args[0]}") from None
    except flags.Error as error:
        raise ValueError(str(error)) from None
    finally:
        sys.argv = saved_argv
    config = flag_values.config
    if config is None:
        raise ValueError("--config=FILE[:ARG] is required")
    if not isinstance(config, ml_collections.ConfigDict):  # the file failed to load
        try:
            config.stage  # noqa: B018 - raises the loading error it holds
        except OSError as error:
            raise ValueError(f"--config: {error.__cause__ or error}") from None
    return config


def _resolved_config_args(args: Sequence[str]) -> list[str]:
    """The arguments with `--config[=]configs/<name>.py[:preset]` pointing at clipgen's own
    config file when there is no such file here (an installed clipgen run outside its
    checkout)."""
    resolved = list(args)
    for index, arg in enumerate(resolved):
        if arg.startswith("--config="):
            prefix, value = "--config=", arg.removeprefix("--config=")
        elif index > 0 and resolved[index - 1] == "--config":
            prefix, value = "", arg
        else:
            continue
        path, colon, preset = value.partition(":")
        if Path(path).exists() or Path(path).parent.name != "configs":
            continue
        from clipgen import config as config_lib

        try:
            resolved[index] = f"{prefix}{config_lib.preset_path(Path(path).stem)}{colon}{preset}"
        except FileNotFoundError:
            continue
    return resolved
