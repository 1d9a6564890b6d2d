"""Run the numbered notebooks in order with papermill.

The pipeline passes each notebook the common parameters (``DATASET``, ``PROFILE``, ``SEED``,
``RUN_DIR``, ``DEVICE``) and the user's ``--param NAME=VALUE`` values, each only to the
notebooks whose ``parameters`` cell declares it. It does not pass the profile's sizes: the
notebook's own :func:`cxrlib.stages.open_stage` call applies the profile named by ``PROFILE``
(``cxrlib/profiles/<name>.yaml``), so a notebook run by hand in JupyterLab with
``PROFILE = "quick"`` runs exactly as it does here. Values given with ``--param`` are pinned:
the profile does not override them. Executed notebooks keep their widgets' state, so the
explorers of a finished run show their last state in JupyterLab without a kernel.
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from cxrlib import config, runs
from cxrlib.stages.runtime import (
    PINNED_ENV,
    load_profile,
    notebook_parameters,
    profile_names,
    profile_overrides,
)


def check_dataset(dataset: str, extra_params: Mapping[str, object] | None = None, *,
                  needs_data_root: bool = True) -> None:
    """Refuse an unknown dataset, or a recipe without ``DATA_ROOT``, before any kernel starts.

    ``dataset`` is ``"phantom"``, a shipped recipe name or the path of a recipe YAML file;
    ``needs_data_root``: whether a selected notebook reads the sources (notebook 01; later
    notebooks rerun on their own read the run folder). Raises ``ValueError`` with a one-line
    message.
    """
    from cxrlib.data.recipes import available_recipes, is_recipe_path

    if dataset == "phantom":
        return
    if is_recipe_path(dataset):
        if not Path(dataset).is_file():
            raise ValueError(f"dataset {dataset!r}: recipe file not found")
    elif dataset not in available_recipes():
        raise ValueError(f"unknown dataset {dataset!r}; choose 'phantom', a recipe "
                         f"({', '.join(available_recipes())}) or the path of a recipe .yaml file")
    if needs_data_root and not (extra_params or {}).get("DATA_ROOT"):
        raise ValueError(f"dataset {dataset!r} is a recipe: give the folder holding its sources with "
                         "--param DATA_ROOT=PATH (e.g. --param DATA_ROOT=../shared/realdata)")


def check_external(profile: str, extra_params: Mapping[str, object] | None = None) -> None:
    """Read every external cohort notebook 01 will assemble (``EXTERNAL``, from ``--param`` or the
    profile) before any kernel starts, so a missing folder, a cohort with no image or a recipe
    naming an unknown class stops the run with one line naming the cohort
    (:class:`cxrlib.data.external.ExternalCohortError`) before anything is trained.

    The data folder is ``EXTERNAL_ROOT``, else ``DATA_ROOT`` (relative: from the project root).
    """
    from cxrlib.data.external import external_specs, load_externals

    params = {**profile_overrides(profile, "01"), **dict(extra_params or {})}
    specs = external_specs(params.get("EXTERNAL"))
    if not specs:
        return
    root = str(params.get("EXTERNAL_ROOT") or params.get("DATA_ROOT") or "")
    load_externals(specs, config.PROJECT_ROOT / root if root else "")


def route_parameters(notebooks: Sequence[Path], extra_params: Mapping[str, object]) -> dict[str, dict[str, object]]:
    """``{notebook stem: the extra parameters it declares}``; a parameter no notebook declares raises.

    Each parameter reaches only the notebooks that declare it, so papermill never warns about
    an unknown parameter. One that none of ``notebooks`` declares raises ``ValueError`` naming
    the notebooks (of all numbered ones) that do declare it.
    """
    declared = {path.stem: set(notebook_parameters(path)) for path in notebooks}
    unknown = sorted(name for name in extra_params if not any(name in names for names in declared.values()))
    if unknown:
        everywhere = {path.stem: set(notebook_parameters(path)) for path in list_notebooks(notebooks[0].parent)}
        where = {name: [stem for stem, names in everywhere.items() if name in names] for name in unknown}
        raise ValueError("; ".join(
            f"no selected notebook declares --param {name}"
            + (f" (declared by {', '.join(stems)})" if stems else " (no notebook declares it)")
            for name, stems in where.items()))
    return {stem: {k: v for k, v in extra_params.items() if k in names} for stem, names in declared.items()}


def list_notebooks(directory: Path | None = None) -> list[Path]:
    """The numbered notebooks (``NN_name.ipynb``) in run order."""
    directory = Path(directory) if directory is not None else config.notebooks_dir()
    return sorted(p for p in directory.glob("*.ipynb") if re.match(r"^\d\d_", p.name))


def trust(notebook: str | os.PathLike) -> None:
    """Sign an executed notebook as trusted (what ``jupyter trust`` does), so JupyterLab draws its widgets.

    JupyterLab renders stored widget views only in trusted notebooks; the pipeline executed
    this one itself, so its outputs are as trustworthy as the notebook's code. The signature
    lives in this user's Jupyter data folder (``nbsignatures.db``): on another machine or
    account, run ``jupyter trust RUN_DIR/notebooks/*.ipynb`` there.
    """
    import nbformat
    from nbformat.sign import NotebookNotary

    nb = nbformat.read(os.fspath(notebook), as_version=4)
    NotebookNotary().sign(nb)


def available_profiles() -> list[str]:
    """The profile names ``--profile`` accepts."""
    return profile_names()


class PipelineError(RuntimeError):
    """A notebook failed; the message names the notebook and the failing cell."""


@dataclass
class StageResult:
    notebook: str
    output: str
    seconds: float
    ok: bool
    error: str = ""


@dataclass
class PipelineResult:
    run_dir: Path
    stages: list[StageResult] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(s.ok for s in self.stages)


def _describe_failure(exc: BaseException, notebook: Path) -> str:
    """Name the notebook and the failing cell of a papermill error (or any other error)."""
    cell_index = getattr(exc, "cell_index", None)  # set by papermill's PapermillExecutionError
    ename = getattr(exc, "ename", type(exc).__name__)
    evalue = getattr(exc, "evalue", str(exc))
    if cell_index is not None:
        first = (str(getattr(exc, "source", "")).strip().splitlines() or [""])[0][:80]
        return f"{notebook.name}: cell {cell_index} ({first!r}) raised {ename}: {evalue}"
    return f"{notebook.name}: {ename}: {evalue}"


def run_pipeline(
    *,
    dataset: str = "phantom",
    profile: str = "default",
    run_dir: str | Path | None = None,
    seed: int = 0,
    device: str = "auto",
    notebooks: Sequence[str] | None = None,
    notebooks_dir: Path | None = None,
    extra_params: dict | None = None,
    kernel_name: str | None = None,
    progress: bool = True,
) -> PipelineResult:
    """Execute the numbered notebooks in order; stop at the first failure.

    ``notebooks`` filters by prefix or stem (e.g. ``["01", "02"]``).
    Executed copies go to ``run_dir/notebooks/``; each stage writes its own artifacts under
    ``run_dir/<notebook stem>/``. A summary ``run_dir/pipeline.json`` records parameters,
    timings, the library version and the machine; ``run_dir/results.md`` (with
    ``summary.json``) holds the headline numbers and claims of every stage that ran. Bad arguments (unknown profile or dataset,
    a parameter no selected notebook declares) raise ``ValueError`` before any kernel starts;
    a failing notebook raises :class:`PipelineError` naming it and its failing cell.
    """
    import papermill as pm

    from cxrlib._kernel_client import RepollingKernelManager

    load_profile(profile)  # an unknown profile fails here, before anything runs or is written
    extra_params = dict(extra_params or {})
    selected = list_notebooks(notebooks_dir)
    if not selected:
        raise ValueError(f"no numbered notebook (NN_name.ipynb) in {notebooks_dir or config.notebooks_dir()}: "
                         "run the pipeline from a clone of the repository (the package alone does not carry "
                         "the notebooks)")
    if notebooks:
        selected = [p for p in selected if any(p.stem == n or p.stem.startswith(n) for n in notebooks)]
        if not selected:
            raise ValueError(f"no notebook matches {list(notebooks)}")
    declared = set().union(*(notebook_parameters(path) for path in selected))
    check_dataset(dataset, extra_params, needs_data_root="DATA_ROOT" in declared)
    if "EXTERNAL" in declared:
        check_external(profile, extra_params)
    routed = route_parameters(selected, extra_params)
    run_dir = runs.resolve_run_dir(run_dir, dataset, profile)
    out_dir = run_dir / "notebooks"
    out_dir.mkdir(parents=True, exist_ok=True)
    result = PipelineResult(run_dir=run_dir)
    from cxrlib.results import git_commit

    # the code the run starts from (later commits during a long run do not change it)
    summary = dict(dataset=dataset, profile=profile, seed=int(seed), device=device, params=extra_params,
                   commit=git_commit(mark_changes=True))
    for nb_path in selected:
        declared = notebook_parameters(nb_path)
        common = {"DATASET": dataset, "PROFILE": profile, "SEED": int(seed), "RUN_DIR": str(run_dir),
                  "DEVICE": device}
        params = {name: value for name, value in common.items() if name in declared}
        params.update(routed[nb_path.stem])
        output = out_dir / nb_path.name
        start = time.perf_counter()
        print(f"[pipeline] {nb_path.name} ({profile}) ...", flush=True)
        pinned_before = os.environ.get(PINNED_ENV)
        os.environ[PINNED_ENV] = json.dumps(sorted(routed[nb_path.stem]))  # the kernel inherits it
        try:
            pm.execute_notebook(
                str(nb_path),
                str(output),
                parameters=params,
                cwd=str(nb_path.parent),
                kernel_name=kernel_name,
                progress_bar=progress,
                log_output=False,
                # the stock client can wait for ever on a reply it missed (see cxrlib._kernel_client)
                kernel_manager_class=RepollingKernelManager,
                store_widget_state=True,
            )
        except Exception as exc:  # papermill raises PapermillExecutionError for cell errors
            seconds = time.perf_counter() - start
            message = _describe_failure(exc, nb_path)
            result.stages.append(StageResult(nb_path.name, str(output), seconds, False, message))
            _write_summary(run_dir / "pipeline.json", result, summary)
            raise PipelineError(f"{message}\n  executed copy with the traceback: {output}") from exc
        finally:
            if pinned_before is None:
                os.environ.pop(PINNED_ENV, None)
            else:
                os.environ[PINNED_ENV] = pinned_before
        trust(output)
        seconds = time.perf_counter() - start
        result.stages.append(StageResult(nb_path.name, str(output), seconds, True))
        print(f"[pipeline] {nb_path.name} done in {seconds:.0f} s", flush=True)
        _write_summary(run_dir / "pipeline.json", result, summary)
    from cxrlib.results import write_results

    print(f"[pipeline] results: {write_results(run_dir)}", flush=True)
    return result


def _write_summary(path: Path, result: PipelineResult, summary: Mapping[str, object]) -> None:
    from cxrlib import __version__

    runs.write_json(path, {
        **summary,
        "cxrlib_version": __version__,
        "python": sys.version.split()[0],
        "cpu": config.cpu_description(),
        "stages": [s.__dict__ for s in result.stages],
    })


def print_outputs(result: PipelineResult) -> None:
    """Tell the user where the executed notebooks, figures and metrics are."""
    run_dir = result.run_dir
    print(f"\nRun finished: {run_dir}")
    print(f"  executed notebooks: {run_dir / 'notebooks'}")
    for stage in result.stages:
        print(f"    {stage.notebook:35s} {stage.seconds:7.1f} s")
    metrics = sorted(run_dir.glob("*/metrics.json"))
    figures = sorted(run_dir.glob("*/*.png"))
    print("  metrics:")
    for m in metrics:
        print(f"    {m}")
    print(f"  figures: {len(figures)} under {run_dir}/<stage>/ ; README figures in {config.figures_dir()}")
