"""Feature spaces of trained classifiers: extraction (cached), 2-D maps and separation.

Zunair & Hamza (2021) show a UMAP of classifier features in which synthetic COVID-19
images sit in a region of their own. A 2-D picture can suggest that and cannot prove it
(UMAP keeps neighbourhoods, not distances or cluster sizes), so this module measures
separation in the feature space itself and draws the picture second:

- :func:`extract_features`: global-average-pooling features ``(N, D)`` of a trained
  classifier (notebook 04) or of notebook 03's feature network, for any manifest rows,
  prepared exactly as the network was trained (size, input mode, masks), batched, and
  cached on disk under a key of checkpoint content + rows + image size + input settings
  (written atomically). Unreadable images are listed and skipped, not fatal;
- :func:`umap_embedding` (umap-learn; seeded, so single-threaded) and
  :func:`pca_embedding` (scikit-learn, the fast linear baseline);
- :func:`separation_report`: silhouette and k-NN purity of the groups real COVID-19 /
  synthetic COVID-19 / normal / pneumonia (:func:`analysis_groups`), with chance levels;
- :func:`synthetic_detectability`: cross-validated k-NN accuracy of telling synthetic
  from real COVID-19, folds grouped by patient (a synthetic image shares the patient of
  its source image).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pandas as pd
import torch

from cxrlib.data import manifest as mf
from cxrlib.data.classification import ClassificationDataset
from cxrlib.data.io import ImageReadError
from cxrlib.models.classifiers import penultimate_features
from cxrlib.runs import atomic_write
from cxrlib.train.classifier import ClassifierTrainResult, load_classifier

#: Group names of :func:`analysis_groups`, in display order.
GROUP_ORDER: tuple[str, ...] = ("normal", "pneumonia", "real covid", "synthetic covid")
#: Bump when the cached file layout or the feature definition changes.
_CACHE_VERSION = 1


def origin_kind(manifest: pd.DataFrame) -> pd.Series:
    """Per row: ``"real"`` or the generator that made it (``"G_NC"``, ``"G_PC"``, ...)."""
    origin = manifest["origin"].astype(str) if "origin" in manifest.columns else pd.Series(
        mf.REAL, index=manifest.index)

    def kind(value: str) -> str:
        parsed = mf.parse_origin(value)
        return parsed[0] if parsed else mf.REAL

    return origin.map(kind)


def analysis_groups(manifest: pd.DataFrame) -> pd.Series:
    """Per row: ``"real covid"``, ``"synthetic covid"``, or the label of a real image (``"normal"``, ...)."""
    synthetic = origin_kind(manifest) != mf.REAL
    label = manifest["label"].astype(str)
    covid = label == "covid"
    return pd.Series(np.where(covid & synthetic, "synthetic covid",
                              np.where(covid, "real covid", np.where(synthetic, "synthetic " + label, label))),
                     index=manifest.index, name="group")


# --------------------------------------------------------------------------- extraction


@dataclass
class Features:
    """Features of manifest rows.

    ``values``: ``(N, D)`` float32 for the ``N`` rows that could be read, in row order;
    ``image_ids``: their ids; ``skipped``: ``{image_id: reason}`` of rows that could not be
    read; ``cache_path``: the cache file (``None`` without ``cache_dir``); ``from_cache``:
    whether the values were read from it.
    """

    values: np.ndarray
    image_ids: list[str]
    skipped: dict[str, str]
    cache_path: Path | None = None
    from_cache: bool = False


def file_digest(path: str | os.PathLike) -> str:
    """SHA-256 of a file's bytes (hex)."""
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _image_ids(rows: pd.DataFrame) -> list[str]:
    if "image_id" in rows.columns:
        return rows["image_id"].astype(str).tolist()
    return [str(i) for i in rows.index]


def feature_cache_key(checkpoint: str | os.PathLike, rows: pd.DataFrame, image_size: int,
                      settings: dict[str, Any] | None = None) -> str:
    """Cache key (hex) of the features of ``rows``: checkpoint content, rows, image size and input settings.

    Rows enter by image id and resolved file path, in order; ``settings`` (e.g. input mode,
    mask column) by value. Retraining a checkpoint, changing a row or resizing changes the key.
    """
    paths = [str(mf.resolve_path(rows, str(p))) for p in rows["path"]] if "path" in rows.columns else []
    payload = {
        "version": _CACHE_VERSION,
        "checkpoint": file_digest(checkpoint),
        "image_size": int(image_size),
        "settings": settings or {},
        "rows": [list(pair) for pair in zip(_image_ids(rows), paths, strict=False)],
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def _as_result(model: ClassifierTrainResult | str | os.PathLike, device: str | torch.device) -> ClassifierTrainResult:
    if isinstance(model, ClassifierTrainResult):
        return model
    return load_classifier(model, device=device)


def _read_cache(path: Path, ids: list[str]) -> Features | None:
    try:
        with np.load(path, allow_pickle=False) as data:
            values = data["values"].astype(np.float32)
            kept = [str(i) for i in data["image_ids"]]
            skipped = json.loads(str(data["skipped"]))
    except (OSError, KeyError, ValueError) as error:
        warnings.warn(f"feature cache {path} is unreadable ({error}); recomputing", stacklevel=3)
        return None
    if not set(kept) <= set(ids) or len(values) != len(kept):
        warnings.warn(f"feature cache {path} does not match its rows; recomputing", stacklevel=3)
        return None
    return Features(values, kept, skipped, path, True)


def _write_cache(path: Path, features: Features) -> None:
    buffer = io.BytesIO()
    np.savez(buffer, values=features.values, image_ids=np.asarray(features.image_ids, dtype=str),
             skipped=np.asarray(json.dumps(features.skipped)))
    atomic_write(path, lambda stream: stream.write(buffer.getvalue()))


def extract_features(
    model: ClassifierTrainResult | str | os.PathLike,
    rows: pd.DataFrame,
    *,
    image_size: int | None = None,
    cache_dir: str | os.PathLike | None = None,
    batch_size: int = 64,
    device: str | torch.device = "cpu",
) -> Features:
    """Penultimate (GAP) features of a trained classifier for manifest ``rows``.

    ``model``: a :class:`~cxrlib.train.classifier.ClassifierTrainResult` or a run folder /
    checkpoint (:func:`~cxrlib.train.classifier.load_classifier`). Images are prepared as
    in the model's training (input mode, masks; ``image_size`` overrides the size); in
    patch mode an image's features are the mean over ``config.eval_patches`` patches.
    ``rows``: manifest rows with ``image_id`` and ``path`` (absolute).

    With ``cache_dir`` the result is stored as ``features-<key>.npz``
    (:func:`feature_cache_key`, written atomically) and read back on the next call.
    A row whose image cannot be read is listed in ``Features.skipped`` with the file and
    the reason, and the others go on.
    """
    result = _as_result(model, device)
    config = result.config
    size = int(image_size or config.image_size)
    ids = _image_ids(rows)
    if len(set(ids)) != len(ids):
        raise ValueError("rows repeat image ids; features are keyed by image id")
    settings = {"input_mode": config.input_mode, "mask_column": config.mask_column,
                "eval_patches": config.eval_patches if config.input_mode == "patch" else None}
    cache_path = None
    if cache_dir is not None:
        key = feature_cache_key(result.checkpoint_path, rows, size, settings)
        cache_path = Path(cache_dir) / f"features-{key[:24]}.npz"
        if cache_path.is_file():
            cached = _read_cache(cache_path, ids)
            if cached is not None:
                return cached
    sized = replace(config, image_size=size)
    dataset = ClassificationDataset(
        rows, image_size=size, label_map=sized.label_map(), input_mode=sized.input_mode,
        augment=None, seed=sized.seed, cache=False, mask_column=sized.mask_column,
        patch_sampler=sized.patch_sampler(), source_size=sized.patch_source_size, strict_labels=False)
    net = result.model
    feature_dim = net.feature_dim
    chunks: list[np.ndarray] = []
    kept: list[str] = []
    skipped: dict[str, str] = {}
    pending: list[torch.Tensor] = []

    def flush() -> None:
        if pending:
            batch = torch.cat(pending) if dataset.input_mode == "patch" else torch.stack(pending)
            values = penultimate_features(net, batch).cpu().numpy()
            if dataset.input_mode == "patch":  # one mean per image over its patches
                values = values.reshape(len(pending), -1, feature_dim).mean(axis=1)
            chunks.append(values.astype(np.float32))
            pending.clear()

    for index, image_id in enumerate(ids):
        try:
            if dataset.input_mode == "patch":
                item = dataset.patches(index, sized.eval_patches)[0]  # (K, 1, S, S)
            else:
                item = dataset[index][0]
        except (ImageReadError, OSError, ValueError) as error:
            skipped[image_id] = str(error)
            continue
        pending.append(item)
        kept.append(image_id)
        if len(pending) >= max(1, batch_size if dataset.input_mode != "patch" else batch_size // sized.eval_patches):
            flush()
    flush()
    values = np.concatenate(chunks) if chunks else np.zeros((0, feature_dim), dtype=np.float32)
    if skipped:
        warnings.warn(f"{len(skipped)} of {len(ids)} image(s) could not be read and were skipped: "
                      + "; ".join(f"{k}: {v}" for k, v in list(skipped.items())[:5]), stacklevel=2)
    features = Features(values, kept, skipped, cache_path, False)
    if cache_path is not None:
        _write_cache(cache_path, features)
    return features


# --------------------------------------------------------------------------- 2-D maps


def _matrix(features: npt.ArrayLike, min_rows: int = 3) -> np.ndarray:
    values = np.asarray(features, dtype=np.float64)
    if values.ndim != 2:
        raise ValueError(f"features must be (N, D), got shape {values.shape}")
    if len(values) < min_rows:
        raise ValueError(f"need at least {min_rows} feature rows, got {len(values)}")
    if not np.isfinite(values).all():
        raise ValueError("features contain NaN or infinite values")
    return values


def _standardised(values: np.ndarray) -> np.ndarray:
    from sklearn.preprocessing import StandardScaler

    return StandardScaler().fit_transform(values)


def umap_embedding(features: npt.ArrayLike, *, n_neighbors: int = 15, min_dist: float = 0.1, seed: int = 0,
                   metric: str = "euclidean", standardize: bool = True) -> np.ndarray:
    """UMAP of ``features`` ``(N, D)`` -> ``(N, 2)`` float32 (umap-learn, seeded).

    With a ``random_state`` umap-learn runs on one thread and repeats exactly. Its first
    call in a process compiles numba code (tens of seconds). ``n_neighbors`` is capped at
    ``N - 1``; ``standardize`` z-scores every feature first (GAP features of different
    channels have very different scales). PyTorch's CPU thread count is kept (numba's
    OpenMP start-up would otherwise reset it to the number of cores).
    """
    import umap

    values = _matrix(features)
    if standardize:
        values = _standardised(values)
    torch_threads = torch.get_num_threads()
    try:
        with warnings.catch_warnings():
            # umap-learn announces that a seed forces one thread; that is what is wanted here
            warnings.filterwarnings("ignore", message=".*n_jobs value.*", category=UserWarning)
            reducer = umap.UMAP(n_neighbors=int(min(n_neighbors, len(values) - 1)), min_dist=float(min_dist),
                                metric=metric, random_state=int(seed), n_jobs=1)
            return reducer.fit_transform(values).astype(np.float32)
    finally:
        # numba's OpenMP start-up resets the shared OpenMP thread count, which PyTorch reads
        torch.set_num_threads(torch_threads)


def pca_embedding(features: npt.ArrayLike, *, n_components: int = 2, seed: int = 0,
                  standardize: bool = True) -> np.ndarray:
    """PCA of ``features`` ``(N, D)`` -> ``(N, n_components)`` float32 (scikit-learn): the linear baseline."""
    from sklearn.decomposition import PCA

    values = _matrix(features)
    if standardize:
        values = _standardised(values)
    return PCA(n_components=n_components, random_state=seed).fit_transform(values).astype(np.float32)


# --------------------------------------------------------------------------- separation


def knn_purity(features: npt.ArrayLike, groups: Sequence[str], *, k: int = 10,
               standardize: bool = True) -> np.ndarray:
    """Per point: the share of its ``k`` nearest neighbours (itself excluded) in its own group, ``(N,)``."""
    from sklearn.neighbors import NearestNeighbors

    values = _matrix(features)
    labels = np.asarray(groups).astype(str)
    if len(labels) != len(values):
        raise ValueError(f"{len(labels)} group labels for {len(values)} feature rows")
    k = int(min(k, len(values) - 1))
    if k < 1:
        raise ValueError("k-NN purity needs at least 2 points")
    values = _standardised(values) if standardize else values
    _, neighbours = NearestNeighbors(n_neighbors=k + 1).fit(values).kneighbors(values)
    # the nearest point is the point itself (or an exact duplicate): drop column 0
    return (labels[neighbours[:, 1:]] == labels[:, None]).mean(axis=1)


def separation_report(features: npt.ArrayLike, groups: Sequence[str], *, k: int = 10,
                      standardize: bool = True) -> dict[str, Any]:
    """How well ``groups`` separate in feature space (not in a 2-D map).

    Returns ``n`` (per group), ``silhouette`` (mean silhouette, euclidean on z-scored
    features; -1..1, 0 = overlapping groups), ``silhouette_per_group``, ``knn_purity``
    (mean share of a point's ``k`` neighbours in its group), ``knn_purity_per_group`` and
    ``knn_purity_chance_per_group`` (the share a random neighbour would give:
    ``(n_g - 1) / (N - 1)``). Silhouette is NaN with fewer than 2 groups.
    """
    from sklearn.metrics import silhouette_samples

    values = _matrix(features)
    labels = np.asarray(groups).astype(str)
    if len(labels) != len(values):
        raise ValueError(f"{len(labels)} group labels for {len(values)} feature rows")
    scaled = _standardised(values) if standardize else values
    names = [g for g in GROUP_ORDER if g in set(labels)] + sorted(set(labels) - set(GROUP_ORDER))
    counts = {g: int((labels == g).sum()) for g in names}
    purity = knn_purity(scaled, labels, k=k, standardize=False)
    report: dict[str, Any] = {"n": counts, "k": int(min(k, len(values) - 1)),
                              "knn_purity": float(purity.mean()),
                              "knn_purity_per_group": {g: float(purity[labels == g].mean()) for g in names},
                              "knn_purity_chance_per_group": {g: (counts[g] - 1) / (len(labels) - 1) for g in names}}
    if 2 <= len(names) < len(values):
        silhouette = silhouette_samples(scaled, labels)
        report["silhouette"] = float(silhouette.mean())
        report["silhouette_per_group"] = {g: float(silhouette[labels == g].mean()) for g in names}
    else:
        report["silhouette"] = float("nan")
        report["silhouette_per_group"] = {g: float("nan") for g in names}
    return report


def synthetic_detectability(features: npt.ArrayLike, is_synthetic: Sequence[bool], patient_ids: Sequence[str], *,
                            k: int = 10, folds: int = 5, seed: int = 0) -> dict[str, Any]:
    """Cross-validated k-NN accuracy of telling synthetic from real images (e.g. COVID-19 ones).

    A z-scoring + ``k``-NN pipeline (scikit-learn) is scored by ``StratifiedGroupKFold``:
    all images of a patient stay in one fold (a synthetic image is grouped with its source
    patient). Returns ``accuracy`` and ``balanced_accuracy`` of the pooled out-of-fold
    predictions, ``chance_accuracy`` (always guessing the larger class; balanced chance is
    0.5), ``fold_balanced_accuracy`` (per fold), ``n_real``, ``n_synthetic``, ``n_folds``.
    With too few patients of a kind for two folds every number is NaN and ``reason`` says why.
    """
    from sklearn.metrics import accuracy_score, balanced_accuracy_score
    from sklearn.model_selection import StratifiedGroupKFold, cross_val_predict
    from sklearn.neighbors import KNeighborsClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    values = _matrix(features, min_rows=1)
    target = np.asarray(is_synthetic, dtype=bool)
    patients = np.asarray(patient_ids).astype(str)
    if not len(target) == len(patients) == len(values):
        raise ValueError("features, is_synthetic and patient_ids must have the same length")
    n_real, n_synthetic = int((~target).sum()), int(target.sum())
    out: dict[str, Any] = {"n_real": n_real, "n_synthetic": n_synthetic, "k": int(k)}
    n_folds = int(min(folds, len(set(patients[target])), len(set(patients[~target]))))
    if n_folds < 2:
        nan = float("nan")
        return {**out, "accuracy": nan, "balanced_accuracy": nan, "chance_accuracy": nan,
                "fold_balanced_accuracy": [], "n_folds": n_folds,
                "reason": f"needs patients of both kinds in >= 2 folds (real: {len(set(patients[~target]))}, "
                          f"synthetic: {len(set(patients[target]))})"}
    splitter = StratifiedGroupKFold(n_splits=n_folds, shuffle=True, random_state=seed)
    splits = list(splitter.split(values, target, patients))
    train_size = min(len(train) for train, _ in splits)
    model = make_pipeline(StandardScaler(), KNeighborsClassifier(n_neighbors=int(min(k, train_size))))
    predicted = cross_val_predict(model, values, target, groups=patients, cv=splits)
    per_fold = [float(balanced_accuracy_score(target[test], predicted[test]))
                if len(set(target[test])) == 2 else float("nan") for _, test in splits]
    return {**out, "accuracy": float(accuracy_score(target, predicted)),
            "balanced_accuracy": float(balanced_accuracy_score(target, predicted)),
            "chance_accuracy": max(n_real, n_synthetic) / len(target), "fold_balanced_accuracy": per_fold,
            "n_folds": n_folds}


__all__ = [
    "GROUP_ORDER", "Features", "analysis_groups", "extract_features", "feature_cache_key", "file_digest",
    "knn_purity", "origin_kind", "pca_embedding", "separation_report", "synthetic_detectability",
    "umap_embedding",
]
