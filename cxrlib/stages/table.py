"""The notebook stages: the one table of what each numbered notebook reads and writes.

One naming scheme: notebook ``notebooks/NN_name.ipynb``, run folder ``RUN_DIR/NN_name/``,
library module ``cxrlib.stages.name``. Every folder name a stage uses comes from
:data:`STAGES`; no other module spells one.

Data flow: each stage reads the manifest of the first stage in its ``manifest_from`` whose
``manifest.csv`` exists in the run folder (priority order), and may read other stages'
outputs named in ``reads``. ``optional`` edges are taken only when the notebook asks for
them (notebook 04 reads notebook 06's manifest, which adds diffusion samples, only when
its ``CONDITIONS`` include ``real_diffusion``: notebook 06 runs after 04, so the edge points
backwards and must be asked for).

A notebook opens and closes its stage with :func:`cxrlib.stages.open_stage` and
:meth:`cxrlib.stages.StageRun.finish` (in :mod:`cxrlib.stages.runtime`).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

MANIFEST = "manifest.csv"
METRICS = "metrics.json"
PARAMS = "params.json"


@dataclass(frozen=True)
class Stage:
    """One numbered notebook: its name (notebook stem = run folder) and its declared edges.

    ``manifest_from``: stage keys whose manifest this stage reads, first existing one wins.
    ``optional``: stage keys read only on request (see :func:`input_manifest`).
    ``reads``: other stage keys whose outputs (models, results) this stage opens.
    ``outputs``: what the stage writes into its folder.
    """

    key: str
    name: str
    title: str
    manifest_from: tuple[str, ...] = ()
    optional: tuple[str, ...] = ()
    reads: tuple[str, ...] = ()
    outputs: tuple[str, ...] = (METRICS, PARAMS)

    @property
    def notebook(self) -> str:
        return f"{self.name}.ipynb"

    @property
    def module(self) -> str:
        """The library module holding this stage's logic (``cxrlib.stages.<name without NN_>``)."""
        return "cxrlib.stages." + self.name.split("_", 1)[1]


STAGES: tuple[Stage, ...] = (
    Stage("01", "01_data_assembly", "Data assembly",
          outputs=(MANIFEST, METRICS, PARAMS, "gallery.png", "unreadable_and_dropped.csv", "dedup_report.csv",
                   "copy_pairs.csv", "copy_boundary_pairs.png", "kept_dropped.csv", "external/")),
    Stage("02", "02_lung_segmentation", "Lung segmentation", manifest_from=("01",),
          outputs=(MANIFEST, METRICS, PARAMS, "model/", "masks/")),
    Stage("03", "03_cyclegan", "CycleGAN synthesis", manifest_from=("02", "01"),
          outputs=(MANIFEST, METRICS, PARAMS, "G_NC/", "G_PC/", "synthetic/", "feature_net/", "oracle/")),
    Stage("04", "04_classifiers", "Classifiers under imbalance", manifest_from=("03", "02", "01"),
          optional=("06",), reads=("03", "01"),
          outputs=(METRICS, PARAMS, "results.csv", "predictions.csv", "summary.csv", "cells/", "controls/",
                   "external.csv", "external_predictions.csv", "external.png")),
    Stage("05", "05_umap_gradcam", "UMAP and Grad-CAM", manifest_from=("03", "02", "01"), optional=("06",),
          reads=("04", "03"), outputs=(METRICS, PARAMS, "features/", "saliency_per_image.csv")),
    Stage("06", "06_diffusion_reader_study", "Diffusion, text removal, reader study",
          manifest_from=("03", "02", "01"), reads=("04", "03"),
          outputs=(MANIFEST, METRICS, PARAMS, "model/", "cleaned/", "reader/")),
)

_BY_KEY: dict[str, Stage] = {stage.key: stage for stage in STAGES}
_BY_NAME: dict[str, Stage] = {stage.name: stage for stage in STAGES}


def get_stage(key_or_name: str | Stage) -> Stage:
    """The stage for ``"04"``, ``"04_classifiers"`` or a :class:`Stage` (unknown names raise ``KeyError``)."""
    if isinstance(key_or_name, Stage):
        return key_or_name
    text = str(key_or_name)
    stage = _BY_KEY.get(text) or _BY_NAME.get(text) or _BY_KEY.get(text[:2] if text[:2].isdigit() else "")
    if stage is None or (len(text) > 2 and stage.name != text):
        raise KeyError(f"unknown stage {key_or_name!r}; stages: {', '.join(s.name for s in STAGES)}")
    return stage


def stage_path(run_dir: str | os.PathLike, stage: str | Stage) -> Path:
    """``RUN_DIR/<stage name>/`` (not created; see :func:`stage_dir`)."""
    return Path(run_dir) / get_stage(stage).name


def stage_dir(run_dir: str | os.PathLike, stage: str | Stage) -> Path:
    """``RUN_DIR/<stage name>/``, created if missing."""
    path = stage_path(run_dir, stage)
    path.mkdir(parents=True, exist_ok=True)
    return path


def input_manifest(run_dir: str | os.PathLike, stage: str | Stage, *,
                   use_optional: Sequence[str] = ()) -> tuple[Path, Stage]:
    """``(path, upstream stage)`` of the manifest ``stage`` reads from ``run_dir``.

    Candidates: the stages of ``use_optional`` (each must be one of the stage's declared
    ``optional`` edges), then ``manifest_from``, in that order; the first whose
    ``manifest.csv`` exists wins. Raises ``FileNotFoundError`` naming every place looked at.
    """
    stage = get_stage(stage)
    unknown = [key for key in use_optional if get_stage(key).key not in stage.optional]
    if unknown:
        raise ValueError(f"stage {stage.name} declares no optional input {unknown}; declared: {list(stage.optional)}")
    candidates = [get_stage(key) for key in (*use_optional, *stage.manifest_from)]
    for upstream in candidates:
        path = stage_path(run_dir, upstream) / MANIFEST
        if path.is_file():
            return path, upstream
    looked = ", ".join(f"{upstream.name}/{MANIFEST}" for upstream in candidates) or "(no input declared)"
    first = candidates[-1].name if candidates else stage.name
    raise FileNotFoundError(f"no input manifest for {stage.name} in {run_dir} (looked for {looked}); "
                            f"run notebook {first} with the same RUN_DIR first")


def output_path(run_dir: str | os.PathLike, stage: str | Stage, name: str) -> Path:
    """The path of output ``name`` of ``stage`` in ``run_dir`` (e.g. ``("03", "metrics.json")``)."""
    return stage_path(run_dir, stage) / name
