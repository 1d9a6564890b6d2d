"""The analysis stage (notebook 05): which classifier to explain, which rows, which masks.

- :func:`choose_classifier`: one classifier of notebook 04's grid, chosen on *validation*
  (the seed with the best validation AUC of the requested task / architecture /
  condition), never on test;
- :func:`embedding_rows`: the rows to embed: every real image plus a seeded sample of
  synthetic ones;
- :func:`lung_mask_columns`, :func:`load_masks`: the masks saliency is scored against
  (reference lung masks where the manifest has them, else notebook 02's predicted ones);
- :func:`explain_rows`: CAMs of manifest rows for several methods, aligned with an image
  to draw them on, and the model's inputs for the faithfulness metrics.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from cxrlib.data import manifest as mf
from cxrlib.data.io import read_mask
from cxrlib.data.transforms import resize_mask
from cxrlib.explain.cam import compute_cams, patch_cam, predict_classes
from cxrlib.explain.embed import analysis_groups, origin_kind
from cxrlib.stages import output_path, stage_path
from cxrlib.stages.external import internal_rows
from cxrlib.train.classifier import ClassifierTrainResult, make_dataset

#: Input modes whose images keep the original image geometry (CAMs can be scored against masks).
MASK_ALIGNED_MODES: tuple[str, ...] = ("whole", "lung_masked", "lungs_removed", "patch")
#: Reference lung masks of the phantom; notebook 02's prediction otherwise.
REFERENCE_LUNG_COLUMNS: tuple[str, ...] = ("mask_lung_left", "mask_lung_right")
PREDICTED_LUNG_COLUMNS: tuple[str, ...] = ("mask_pred_lung", "pred_lung_mask")


@dataclass
class ClassifierChoice:
    """The classifier notebook 05 explains: its results row, run folder and why it was chosen."""

    row: dict[str, Any]
    cell_dir: Path
    reason: str
    candidates: pd.DataFrame = field(repr=False, default_factory=pd.DataFrame)


def read_grid_results(run_dir: str | os.PathLike) -> pd.DataFrame:
    """Notebook 04's ``results.csv``, its internal-test rows (one per trained cell; the rows of
    external cohorts are left out); FileNotFoundError when it is missing."""
    path = output_path(run_dir, "04", "results.csv")
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: run notebook 04 with the same RUN_DIR first")
    results = internal_rows(pd.read_csv(path))  # one row per cell: the internal test split
    missing = {"task", "arch", "condition", "seed", "best_val_auc", "cell_dir"} - set(results.columns)
    if missing:
        raise ValueError(f"{path} lacks columns {sorted(missing)}; it was not written by notebook 04")
    return results


def choose_classifier(results: pd.DataFrame, run_dir: str | os.PathLike, *, task: str = "", arch: str = "",
                      condition: str = "real_gnc_gpc", fallbacks: Sequence[str] = ("real",),
                      imbalance: str = "") -> ClassifierChoice:
    """The cell to explain: ``task`` / ``arch`` / ``imbalance`` (empty: the first in ``results``) and
    ``condition`` (else the first of ``fallbacks`` that was run); among its seeds the one with
    the highest *validation* AUC (ties: the lowest seed). Test metrics play no part.
    """
    if results.empty:
        raise ValueError("notebook 04's results are empty: no classifier to explain")
    task = task or str(results["task"].iloc[0])
    arch = arch or str(results["arch"].iloc[0])
    rows = results[(results["task"] == task) & (results["arch"] == arch)]
    if "imbalance" in rows.columns:
        imbalance = imbalance or (str(rows["imbalance"].iloc[0]) if len(rows) else "")
        rows = rows[rows["imbalance"].astype(str) == imbalance] if imbalance else rows
    if rows.empty:
        raise ValueError(f"notebook 04 trained no {arch} for task {task!r} (imbalance {imbalance or 'any'})")
    run = [c for c in (condition, *fallbacks) if (rows["condition"] == c).any()]
    if not run:
        raise ValueError(f"none of the conditions {[condition, *fallbacks]} was trained for {task} / {arch}; "
                         f"trained: {sorted(rows['condition'].unique())}")
    chosen_condition = run[0]
    note = "" if chosen_condition == condition else f" ({condition!r} was not trained; fell back)"
    candidates = rows[rows["condition"] == chosen_condition].sort_values(["best_val_auc", "seed"],
                                                                          ascending=[False, True])
    best = candidates.iloc[0].to_dict()
    reason = (f"{task} / {arch} / {chosen_condition}{note} / {best.get('imbalance', '')}: seed {best['seed']} has "
              f"the best validation AUC ({best['best_val_auc']:.3f}) of {len(candidates)} seed(s)")
    return ClassifierChoice(row=best, cell_dir=stage_path(run_dir, "04") / str(best["cell_dir"]),
                            reason=reason, candidates=candidates)


def read_cell_predictions(choice: ClassifierChoice) -> pd.DataFrame:
    """The chosen cell's test predictions with a ``correct`` column (prediction at the validation threshold)."""
    path = choice.cell_dir / "predictions.csv"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: the cell was not finished by notebook 04")
    predictions = pd.read_csv(path, dtype={"image_id": str, "patient_id": str})
    predictions["correct"] = predictions["pred"].astype(str) == predictions["label"].astype(str)
    return predictions


def embedding_rows(manifest: pd.DataFrame, *, max_synthetic: int = 300, seed: int = 0) -> pd.DataFrame:
    """Every real row plus at most ``max_synthetic`` synthetic rows (seeded, in proportion per generator).

    Adds ``group`` (:func:`~cxrlib.explain.embed.analysis_groups`) and ``made_by``
    (``real`` / generator).
    """
    kind = origin_kind(manifest)
    real = manifest[kind == mf.REAL]
    synthetic = manifest[kind != mf.REAL]
    if len(synthetic) > max_synthetic:
        synthetic = synthetic.sample(n=max(0, int(max_synthetic)), random_state=seed).sort_index()
    rows = pd.concat([real, synthetic])
    return rows.assign(group=analysis_groups(rows), made_by=origin_kind(rows))


def _present(value: Any) -> bool:
    return isinstance(value, str) and value.strip() != "" and value.lower() != "nan"


def lung_mask_columns(manifest: pd.DataFrame) -> tuple[tuple[str, ...], str]:
    """``(columns, description)`` of the lung masks to score CAMs against: the reference masks
    where every row has them (phantom), else notebook 02's predicted mask; ``((), reason)`` if none."""
    if all(c in manifest.columns for c in REFERENCE_LUNG_COLUMNS) and len(manifest) and all(
            manifest[c].map(_present).all() for c in REFERENCE_LUNG_COLUMNS):
        return REFERENCE_LUNG_COLUMNS, "reference lung masks (mask_lung_left + mask_lung_right)"
    for column in PREDICTED_LUNG_COLUMNS:
        if column in manifest.columns and manifest[column].map(_present).all():
            return (column,), f"notebook 02's predicted lung masks ({column})"
    return (), "no lung masks for these rows (run notebook 02)"


def load_masks(rows: pd.DataFrame, columns: Sequence[str], size: int) -> list[np.ndarray | None]:
    """Per row, the union of the mask files in ``columns`` as ``(size, size)`` bool, or ``None``
    when the row has none of them (e.g. an image without lesion) or the file cannot be read."""
    masks: list[np.ndarray | None] = []
    problems: list[str] = []
    for row in rows.to_dict("records"):
        union = None
        for column in columns:
            value = row.get(column)
            if not _present(value):
                continue
            try:
                mask = resize_mask(read_mask(mf.resolve_path(rows, str(value))) > 0, size)
            except (OSError, ValueError) as error:
                problems.append(f"{row.get('image_id', '?')} {column}: {error}")
                union = None
                break
            union = mask if union is None else union | mask
        masks.append(union)
    if problems:
        warnings.warn(f"{len(problems)} mask file(s) could not be read; those rows have no mask: "
                      + "; ".join(problems[:5]), stacklevel=2)
    return masks


@dataclass
class ExplainedImages:
    """CAMs of some manifest rows.

    ``rows``: the rows (order of everything else); ``inputs``: ``(N, 1, s, s)`` float in
    [0, 1], what the model took (``None`` in patch mode); ``display``: ``(N, S, S)`` uint8,
    the image the maps align with (the model's view at ``display_size``, or the patch
    source image); ``maps``: method -> ``(N, h, w)`` in [0, 1] (input size; source size in
    patch mode); ``probabilities``: ``(N, C)``; ``target_classes``: ``(N,)`` the class each map explains.
    """

    rows: pd.DataFrame
    inputs: torch.Tensor | None
    display: np.ndarray
    maps: dict[str, np.ndarray]
    probabilities: np.ndarray
    target_classes: np.ndarray


def explain_rows(result: ClassifierTrainResult, rows: pd.DataFrame, methods: Sequence[str], *,
                 target_class: int | Sequence[int] | None = None, layer: str | None = None,
                 display_size: int = 256, patch_k: int = 20, seed: int = 0) -> ExplainedImages:
    """CAMs of ``rows`` for each of ``methods`` with the model ``result``.

    ``target_class``: one class index for all rows, one per row, or ``None`` (each image's
    predicted class). Whole-image models get :func:`~cxrlib.explain.cam.compute_cams` on
    exactly the images they were tested on; patch models get the probabilistic patch CAM
    (:func:`~cxrlib.explain.cam.patch_cam`, ``patch_k`` patches seeded by ``seed``).
    """
    config = result.config
    model = result.model
    rows = rows.reset_index(drop=True)
    dataset = make_dataset(rows, config, train=False, strict_labels=False)
    if config.input_mode == "patch":
        probabilities = np.stack([predict_classes(model, dataset.patches(i, patch_k, seed)[0]).mean(axis=0)
                                  for i in range(len(dataset))]) if len(dataset) else np.zeros((0, model.num_classes))
    else:
        inputs = torch.stack([dataset[i][0] for i in range(len(dataset))]) if len(dataset) else \
            torch.zeros((0, 1, config.image_size, config.image_size))
        probabilities = predict_classes(model, inputs)
    if target_class is None:
        targets = probabilities.argmax(axis=1) if len(probabilities) else np.zeros(0, dtype=int)
    elif isinstance(target_class, int | np.integer):
        targets = np.full(len(rows), int(target_class))
    else:
        targets = np.asarray(target_class, dtype=int)
    maps: dict[str, np.ndarray] = {}
    if config.input_mode == "patch":
        display = np.stack([dataset.stored(i)[0] for i in range(len(dataset))]) if len(dataset) else \
            np.zeros((0, config.patch_source_size, config.patch_source_size), dtype=np.uint8)
        for method in methods:
            maps[method] = np.stack([patch_cam(model, dataset, i, target_class=int(targets[i]), k=patch_k,
                                               method=method, layer=layer, seed=seed).cam
                                     for i in range(len(dataset))]).astype(np.float32) if len(dataset) else \
                np.zeros_like(display, dtype=np.float32)
        return ExplainedImages(rows, None, display, maps, probabilities, targets)
    shown = make_dataset(rows, replace(config, image_size=display_size), train=False, strict_labels=False)
    display = np.stack([shown.stored(i)[0] for i in range(len(shown))]) if len(shown) else \
        np.zeros((0, display_size, display_size), dtype=np.uint8)
    for method in methods:
        maps[method] = compute_cams(model, inputs, method=method, target_class=targets.tolist(), layer=layer)
    return ExplainedImages(rows, inputs, display, maps, probabilities, targets)


def seed_choices(choice: ClassifierChoice, run_dir: str | os.PathLike) -> list[ClassifierChoice]:
    """One :class:`ClassifierChoice` per training seed of the chosen cell (its ``candidates``), by seed.

    Saliency is a property of a training run as much as of a method: a pointing game measured
    on the one seed with the best validation AUC says nothing about the next rerun. Notebook 05
    scores every seed's classifier and pools them with a two-level interval.
    """
    rows = choice.candidates.sort_values("seed").to_dict("records") if len(choice.candidates) else [choice.row]
    return [ClassifierChoice(row=row, cell_dir=stage_path(run_dir, "04") / str(row["cell_dir"]),
                             reason=f"seed {row['seed']} of {choice.reason.split(':')[0]}") for row in rows]


def saliency_images(choices: Sequence[ClassifierChoice], positive_label: str, *, only_correct: bool,
                    max_images: int, seed: int = 0) -> list[str]:
    """The COVID-19 test images every seed's classifier is scored on: one seeded sample for all seeds.

    The pool is every ``positive_label`` test image (``only_correct``: those at least one seed
    classified correctly; :func:`saliency_over_seeds` then scores, per seed, only the images
    that seed got right). At most ``max_images`` are drawn with ``seed``.
    """
    tables = [read_cell_predictions(choice).set_index("image_id") for choice in choices]
    first = tables[0]
    pool = first.index[first["label"].astype(str) == positive_label].astype(str)
    if only_correct:
        pool = pool[[any(bool(table.loc[i, "correct"]) for table in tables) for i in pool]]
    return pd.Series(pool, dtype=str).sample(n=min(max_images, len(pool)), random_state=seed).tolist()


def with_expert_lesions(rows: pd.DataFrame, expert: pd.DataFrame, out_dir: str | os.PathLike) -> pd.DataFrame:
    """``rows`` with a ``mask_lesion`` column from expert annotations of the same films.

    ``expert``: the covid-segmentations manifest; a row of ``rows`` (manifest rows, e.g. the
    test images) showing an annotated film (:func:`cxrlib.stages.lung_segmentation.link_expert_masks`:
    same film, same patient) gets the union of the experts' ground-glass and consolidation
    masks on its own image grid, written to ``out_dir/<image id>.png``; an annotated film with
    no lesion drawn gets an empty mask (a real "no lesion"); every other row keeps its own
    ``mask_lesion`` (the phantom's) or ``""`` (no reference: no pointing game). The index and
    the row order of ``rows`` are kept; ``expert_image_id`` names the annotation used.
    """
    from cxrlib.data.io import read_image, write_png
    from cxrlib.stages.lung_segmentation import expert_lesion_mask, file_stem, link_expert_masks

    linked = link_expert_masks(rows.reset_index(drop=True), expert)
    out_dir = Path(out_dir)
    previous = rows["mask_lesion"].tolist() if "mask_lesion" in rows.columns else [""] * len(rows)
    paths: list[str] = []
    for row, before in zip(linked.to_dict("records"), previous, strict=True):
        if not row["expert_image_id"]:
            paths.append(before if _present(before) else "")
            continue
        shape = read_image(mf.resolve_path(None, str(row["path"]))).shape
        lesion = expert_lesion_mask(row, shape)
        if lesion is None:  # linked, but without lung masks: no reference
            paths.append("")
            continue
        target = out_dir / f"{file_stem(row['image_id'])}.png"
        write_png(target, lesion.astype(np.uint8) * 255)
        paths.append(str(target.resolve()))
    out = rows.copy()
    out["mask_lesion"] = paths
    out["expert_image_id"] = linked["expert_image_id"].to_numpy()
    return out


def saliency_over_seeds(choices: Sequence[ClassifierChoice], test_rows: pd.DataFrame, eval_ids: Sequence[str],
                        methods: Sequence[str], *, load: Any, only_correct: bool, positive_label: str,
                        lung_columns: Sequence[str], size: int, layer: str | None = None, tolerance: float = 0.0,
                        n_random: int = 10, random_grid: int | tuple[int, int] = 7, centre_sigma: float = 0.25,
                        road_percentiles: Sequence[int] = (50,), patch_k: int = 20, seed: int = 0,
                        log: Any = None) -> pd.DataFrame:
    """Per-image saliency scores of every seed's classifier on the same COVID-19 test images.

    ``test_rows``: manifest rows indexed by ``image_id``; ``eval_ids``: the images to score
    (one sample for every seed). With ``only_correct`` a seed scores only the images its own
    model classified correctly (others are missing for that seed, not zero). ``load``: a
    function ``cell_dir -> ClassifierTrainResult`` (``cxrlib.train.classifier.load_classifier``
    with the device bound). Returns :func:`cxrlib.explain.saliency.score_images` rows (and ROAD /
    CAM-multiply where the model takes whole images) with a ``seed`` column.
    """
    from cxrlib.explain import saliency as sal

    parts = []
    for choice in choices:
        predictions = read_cell_predictions(choice).set_index("image_id")
        ids = [i for i in eval_ids if not only_correct or bool(predictions.loc[i, "correct"])]
        if not ids:
            continue
        model = load(choice.cell_dir)
        rows = test_rows.loc[ids]
        explained = explain_rows(model, rows, methods, target_class=model.classes.index(positive_label), layer=layer,
                                 display_size=size, patch_k=patch_k, seed=seed)
        lung_masks = load_masks(rows, lung_columns, size) if lung_columns else None
        lesion_masks = load_masks(rows, ["mask_lesion"], size) if "mask_lesion" in rows.columns else None
        scores = sal.score_images(explained.maps, ids, lung_masks=lung_masks, lesion_masks=lesion_masks,
                                  patient_ids=rows["patient_id"].astype(str).tolist(), tolerance=tolerance,
                                  n_random=n_random, random_grid=random_grid, centre_sigma=centre_sigma, seed=seed)
        if explained.inputs is not None:  # faithfulness needs the model's own input (not patch mode)
            scores = sal.score_faithfulness(scores, model.model, explained.inputs, explained.maps,
                                            model.classes.index(positive_label), percentiles=road_percentiles,
                                            random_grid=random_grid, centre_sigma=centre_sigma, seed=seed)
        parts.append(scores.assign(seed=int(choice.row["seed"])))
        if log is not None:
            log(f"seed {choice.row['seed']}: {len(ids)} image(s) scored")
    return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame()


def external_saliency(choice: ClassifierChoice, cohorts: Mapping[str, pd.DataFrame], methods: Sequence[str], *,
                      load: Any, positive_label: str, size: int, max_images: int = 30, layer: str | None = None,
                      tolerance: float = 0.0, n_random: int = 10, random_grid: int | tuple[int, int] = 7,
                      centre_sigma: float = 0.25, patch_k: int = 20, n_boot: int = 1000,
                      seed: int = 0) -> tuple[dict[str, pd.DataFrame], dict[str, str]]:
    """Lung overlap (and, where lesion masks exist, pointing game and lesion energy) of the chosen
    classifier's ``positive_label`` CAMs on each external cohort (``{name: manifest}``,
    :func:`cxrlib.data.external.read_external`) that has lung masks.

    At most ``max_images`` ``positive_label`` images per cohort (a seeded sample; every one, right
    or wrong, since the external images carry no prediction of this model yet) are scored with
    :func:`cxrlib.explain.saliency.score_images` against the cohort's own masks, then summarised
    per method with 95 % intervals over patients (:func:`cxrlib.explain.saliency.summarize_scores`).
    Returns ``({name: summary table}, {name: why it was skipped})``.
    """
    from cxrlib.explain import saliency as sal

    summaries: dict[str, pd.DataFrame] = {}
    skipped: dict[str, str] = {}
    model = None
    for name, cohort in cohorts.items():
        rows = cohort[cohort["label"].astype(str) == positive_label].drop_duplicates("image_id")
        columns, reason = lung_mask_columns(rows)
        if rows.empty or not columns:
            skipped[name] = f"no {positive_label} image" if rows.empty else reason
            continue
        rows = rows.sample(n=min(max_images, len(rows)), random_state=seed).reset_index(drop=True)
        model = model or load(choice.cell_dir)
        explained = explain_rows(model, rows, methods, target_class=model.classes.index(positive_label), layer=layer,
                                 display_size=size, patch_k=patch_k, seed=seed)
        lesion = ("mask_lesion" in rows.columns and rows["mask_lesion"].map(_present).all())
        per_image = sal.score_images(explained.maps, rows["image_id"].astype(str).tolist(),
                                     lung_masks=load_masks(rows, columns, size),
                                     lesion_masks=load_masks(rows, ["mask_lesion"], size) if lesion else None,
                                     patient_ids=rows["patient_id"].astype(str).tolist(), tolerance=tolerance,
                                     n_random=n_random, random_grid=random_grid, centre_sigma=centre_sigma, seed=seed)
        measures = [m for m in ("lung_overlap", "pointing_game", "lesion_energy")
                    if m in per_image.columns and per_image[m].notna().any()]
        summaries[name] = sal.summarize_scores(per_image, measures, n_boot=n_boot, seed=seed)
    return summaries, skipped


__all__ = [
    "ClassifierChoice", "ExplainedImages", "MASK_ALIGNED_MODES", "choose_classifier",
    "embedding_rows", "explain_rows", "external_saliency", "load_masks", "lung_mask_columns", "read_cell_predictions",
    "read_grid_results", "saliency_images", "saliency_over_seeds", "seed_choices", "with_expert_lesions",
]
