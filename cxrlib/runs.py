"""Run folders and the files in them: JSON records and atomic writes.

A run folder holds one folder per notebook stage (named in :data:`cxrlib.stages.STAGES`), each
with ``metrics.json`` (headline numbers, machine-comparable across runs) and ``params.json``
(the resolved settings that produced them), written by :meth:`cxrlib.stages.StageRun.finish`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from cxrlib import config


def resolve_run_dir(run_dir: str | os.PathLike | None, dataset: str, profile: str) -> Path:
    """``RUN_DIR`` parameter -> absolute folder; empty means ``$CXR_RUNS_DIR/<dataset>-<profile>``."""
    if run_dir:
        return Path(run_dir).expanduser().resolve()
    safe_dataset = Path(str(dataset)).stem or "dataset"
    return config.runs_dir() / f"{safe_dataset}-{profile}"


def to_plain(value: Any) -> Any:
    """``value`` as plain JSON-friendly data: dataclasses, mappings, sequences, paths, devices,
    NumPy / torch scalars and arrays; non-finite floats become ``None``.

    Plain data is also what ``torch.load(..., weights_only=True)`` accepts besides tensors.
    """
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return to_plain(dataclasses.asdict(value))
    if isinstance(value, Mapping):
        return {str(k): to_plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set):
        return [to_plain(v) for v in value]
    if isinstance(value, bool | int | None):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, str):
        return str(value)  # str subclasses (torch.__version__) become plain strings
    if hasattr(value, "tolist"):  # NumPy scalar or array, torch tensor
        return to_plain(value.tolist())
    return str(value)  # Path, torch.device, torch.dtype, ...


def atomic_write(path: Path, write: Callable[[Any], None], mode: str = "wb") -> None:
    """Write through a temporary file in the same folder, then rename over ``path``.

    A crash mid-write leaves the previous file intact instead of a truncated one. The
    temporary name is unique per process (ranks or notebooks writing side by side), and
    ``open(..., "x")`` keeps the umask's permissions, unlike ``tempfile``'s private files.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp_path = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp_path, mode.replace("w", "x")) as stream:
            write(stream)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(tmp_path, path)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


def write_json(path: str | os.PathLike, payload: Any) -> Path:
    """Write ``payload`` (made plain by :func:`to_plain`) as indented JSON, atomically."""
    text = json.dumps(to_plain(payload), indent=2) + "\n"
    atomic_write(Path(path), lambda stream: stream.write(text), mode="w")
    return Path(path)


def read_json(path: str | os.PathLike) -> Any:
    return json.loads(Path(path).read_text())
