"""Opening and closing a notebook stage: profiles, parameters, seeds, folders, records.

A notebook's parameters live in one place, its ``parameters`` cell (plain literals, the
``default`` profile). A *profile* (``cxrlib/profiles/<name>.yaml``) is a small file of
overrides per notebook, in the manner of MONAI bundle configs. The first code cell after
the parameters calls::

    stage = open_stage("04", globals())

which applies the profile named by ``PROFILE`` to the notebook's globals (so a notebook run
by hand with ``PROFILE = "quick"`` gets the quick sizes, exactly as ``python -m cxrlib
pipeline --profile quick`` does), seeds everything, resolves the run folder, device and CPU
threads, and records every UPPER_CASE parameter. The last cell calls
``stage.finish(metrics)``, which writes ``metrics.json`` and ``params.json`` (every
parameter, the profile's overrides, the library version, the machine).

Precedence: notebook default < profile override < a value the user pins. The pipeline pins
the values given with ``--param NAME=VALUE`` (through ``CXR_PINNED_PARAMS`` in the kernel's
environment), so a profile never overrides what was asked for on the command line.
"""

from __future__ import annotations

import ast
import json
import os
import platform
import time
from collections.abc import Mapping, MutableMapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import cache, lru_cache
from pathlib import Path
from typing import Any

import yaml

from cxrlib import config, runs
from cxrlib.stages.table import (
    METRICS,
    PARAMS,
    Stage,
    get_stage,
    input_manifest,
    stage_dir,
    stage_path,
)

#: Environment variable naming (as a JSON list) the parameters a user pinned on the command line.
PINNED_ENV = "CXR_PINNED_PARAMS"
#: Parameters every notebook declares (the pipeline passes them to each).
COMMON_PARAMETERS: tuple[str, ...] = ("DATASET", "PROFILE", "SEED", "RUN_DIR", "DEVICE")
PROFILES_DIR = Path(__file__).resolve().parent.parent / "profiles"


class ProfileError(ValueError):
    """An unknown profile, or a profile that sets a parameter its notebook does not declare."""


# ----------------------------------------------------------------------------- profiles


def profile_names() -> list[str]:
    """The shipped profiles (``cxrlib/profiles/*.yaml``), sorted."""
    return sorted(path.stem for path in PROFILES_DIR.glob("*.yaml"))


@cache
def _profile_file(name: str) -> dict[str, dict[str, Any]]:
    path = PROFILES_DIR / f"{name}.yaml"
    try:
        table = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ProfileError(f"{path}: not valid YAML ({exc})") from None
    if not isinstance(table, dict) or not all(isinstance(v, dict) for v in table.values()):
        raise ProfileError(f"{path}: expected a mapping of notebook stem -> mapping of parameters")
    for stage_name in table:
        get_stage(stage_name)  # a misspelt notebook stem fails here, not silently
    return table


def load_profile(name: str) -> dict[str, dict[str, Any]]:
    """``{notebook stem: {PARAMETER: value}}`` of profile ``name`` (a copy)."""
    if name not in profile_names():
        raise ProfileError(f"unknown profile {name!r}; choose one of {profile_names()}")
    return {stage: dict(values) for stage, values in _profile_file(name).items()}


def profile_overrides(profile: str, stage: str | Stage) -> dict[str, Any]:
    """The parameters ``profile`` sets for ``stage`` (empty for the ``default`` profile)."""
    return load_profile(profile).get(get_stage(stage).name, {})


# ----------------------------------------------------------------------------- notebook parameters


def notebook_path(stage: str | Stage, notebooks_dir: str | os.PathLike | None = None) -> Path:
    folder = Path(notebooks_dir) if notebooks_dir is not None else config.notebooks_dir()
    return folder / get_stage(stage).notebook


def notebook_parameters(notebook: str | os.PathLike | Stage) -> dict[str, Any]:
    """The defaults of a notebook's ``parameters`` cell: ``{NAME: literal value}`` in cell order.

    ``notebook`` is a stage (key or name) or a notebook path. Raises ``ValueError`` if the
    notebook has no tagged ``parameters`` cell or a statement in it is not ``NAME = literal``.
    """
    path = Path(notebook) if str(notebook).endswith(".ipynb") else notebook_path(notebook)
    return dict(_parameters_of(str(path.resolve()), path.stat().st_mtime_ns))


@lru_cache(maxsize=32)
def _parameters_of(path: str, _mtime: int) -> tuple[tuple[str, Any], ...]:
    cells = json.loads(Path(path).read_text())["cells"]
    for cell in cells:
        if "parameters" in cell.get("metadata", {}).get("tags", []):
            source = "".join(cell["source"])
            values = []
            for node in ast.parse(source).body:
                if not (isinstance(node, ast.Assign) and len(node.targets) == 1
                        and isinstance(node.targets[0], ast.Name)):
                    raise ValueError(f"{path}: the parameters cell may only hold NAME = literal lines")
                values.append((node.targets[0].id, ast.literal_eval(node.value)))
            return tuple(values)
    raise ValueError(f"{path}: no cell tagged 'parameters'")


def stage_parameters(stage: str | Stage, profile: str = "default", **pinned: Any) -> dict[str, Any]:
    """What ``stage``'s notebook would run with: its defaults, the profile's overrides, then ``pinned``.

    The way for one stage to know another's settings (notebook 06 builds notebook 04's site
    classifier from it) without copying them.
    """
    params = notebook_parameters(stage)
    params.update(profile_overrides(profile, stage))
    params.update(pinned)
    return params


def pinned_names(environ: Mapping[str, str] | None = None) -> frozenset[str]:
    """Parameters the user pinned on the command line (``CXR_PINNED_PARAMS``, a JSON list)."""
    text = (os.environ if environ is None else environ).get(PINNED_ENV, "")
    return frozenset(json.loads(text)) if text.strip() else frozenset()


def apply_profile(namespace: MutableMapping[str, Any], stage: str | Stage, profile: str, *,
                  pinned: frozenset[str] = frozenset()) -> dict[str, Any]:
    """Write ``profile``'s overrides for ``stage`` into ``namespace`` (except ``pinned`` names).

    Returns the overrides applied. A profile that sets a parameter the namespace does not
    hold (the notebook does not declare it) raises :class:`ProfileError`.
    """
    overrides = profile_overrides(profile, stage)
    undeclared = sorted(set(overrides) - set(namespace))
    if undeclared:
        raise ProfileError(f"profile {profile!r} sets {undeclared} for {get_stage(stage).name}, "
                           "which its notebook does not declare")
    applied = {name: value for name, value in overrides.items() if name not in pinned}
    namespace.update(applied)
    return applied


def _is_parameter(name: str, value: Any) -> bool:
    return name.isupper() and not name.startswith("_") and isinstance(
        value, str | int | float | bool | list | tuple | dict | type(None))


# ----------------------------------------------------------------------------- the stage run


@dataclass
class StageRun:
    """An open stage: where it writes, what it runs on, and the parameters it ran with."""

    stage: Stage
    run_dir: Path
    out_dir: Path
    device: Any
    params: dict[str, Any]
    profile_overrides: dict[str, Any] = field(default_factory=dict)
    started: float = field(default_factory=time.perf_counter)

    def path_of(self, stage: str | Stage, name: str = "") -> Path:
        """A file or folder of another stage in this run (``stage.path_of("03", "metrics.json")``)."""
        folder = stage_path(self.run_dir, stage)
        return folder / name if name else folder

    def input_manifest(self, *, use_optional: tuple[str, ...] = ()) -> tuple[Path, Stage]:
        """``(path, upstream stage)`` of the manifest this stage reads (see :func:`cxrlib.stages.input_manifest`)."""
        return input_manifest(self.run_dir, self.stage, use_optional=use_optional)

    @property
    def seconds(self) -> float:
        return time.perf_counter() - self.started

    def finish(self, metrics: Mapping[str, Any], **extra: Any) -> Path:
        """Write ``metrics.json`` and ``params.json`` into the stage folder; return the metrics path.

        ``params.json`` holds every parameter the notebook ran with (recorded at
        :func:`open_stage`), the profile's overrides, ``extra`` (resolved configs, input
        paths, checkpoints), the library version and the machine.
        """
        import numpy
        import torch

        from cxrlib import __version__

        runs.write_json(self.out_dir / PARAMS, {
            "stage": self.stage.name,
            "params": self.params,
            "profile_overrides": self.profile_overrides,
            **extra,
            "cxrlib_version": __version__,
            "written_at": datetime.now(UTC).isoformat(timespec="seconds"),
            "python": platform.python_version(),
            "platform": platform.platform(),
            "cpu": config.cpu_description(),
            "numpy": numpy.__version__,
            "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(),
        })
        return runs.write_json(self.out_dir / METRICS, dict(metrics))


def open_stage(stage: str | Stage, namespace: MutableMapping[str, Any], *, quiet: bool = False) -> StageRun:
    """Open ``stage`` for a notebook whose globals are ``namespace`` (pass ``globals()``).

    Applies the ``PROFILE``'s overrides to ``namespace`` (parameters pinned on the command line
    win), seeds Python / NumPy / PyTorch from ``SEED`` and asks PyTorch for deterministic
    algorithms where it has them, resolves ``RUN_DIR`` (empty:
    ``runs/<DATASET>-<PROFILE>``), creates the stage folder, resolves ``DEVICE`` and sets
    PyTorch's CPU threads from ``NUM_THREADS`` when the notebook declares it (0: every core
    this process may use; never derived from the machine's current load, so a rerun under
    another load computes the same numbers). Records every UPPER_CASE parameter.
    """
    stage = get_stage(stage)
    missing = [name for name in COMMON_PARAMETERS if name not in namespace]
    if missing:
        raise ValueError(f"notebook {stage.notebook} does not declare {missing} in its parameters cell")
    profile = str(namespace["PROFILE"])
    applied = apply_profile(namespace, stage, profile, pinned=pinned_names())
    config.seed_everything(int(namespace["SEED"]), deterministic=True)
    run_dir = runs.resolve_run_dir(namespace["RUN_DIR"], namespace["DATASET"], profile)
    out_dir = stage_dir(run_dir, stage)
    device = config.resolve_device(str(namespace["DEVICE"]))
    if "NUM_THREADS" in namespace:
        config.set_cpu_threads(int(namespace["NUM_THREADS"]))
    params = {name: value for name, value in namespace.items() if _is_parameter(name, value)}
    params["RUN_DIR"] = str(run_dir)
    run = StageRun(stage=stage, run_dir=run_dir, out_dir=out_dir, device=device, params=runs.to_plain(params),
                   profile_overrides=runs.to_plain(applied))
    if not quiet:
        import torch

        print(f"{stage.name} | run folder: {run_dir} | profile: {profile}"
              f"{' (' + ', '.join(f'{k}={v!r}' for k, v in applied.items()) + ')' if applied else ''}"
              f" | device: {device} | CPU threads: {torch.get_num_threads()}")
    return run
