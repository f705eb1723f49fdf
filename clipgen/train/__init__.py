"""Training: one sharded loop (`loop.py`) and one file per stage with its batch, its loss
and its sampling preview."""

from __future__ import annotations

import importlib
from types import ModuleType


def trainer(name: str) -> ModuleType:
    """The trainer of stage `name`: `clipgen.train.<name>`, or an importable module called
    `name` (a stage of one's own); it has make_stage(config)."""
    for module_name in (f"{__name__}.{name}", name):
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as error:
            if error.name not in (module_name, f"{__name__}.{name.split('.')[0]}"):
                raise
            continue
        if not hasattr(module, "make_stage"):
            raise ValueError(f"stage module {module_name} has no make_stage(config)")
        return module
    raise ValueError(f"config.stage={name!r}: no module {__name__}.{name} or {name}")
