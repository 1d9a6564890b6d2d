"""A blinded real-vs-synthetic reader study: sequences, crash-safe answer files, scores.

"This X-Ray Does Not Exist" (2024) asked radiologists to tell real chest X-rays from
synthetic ones (accuracy 0.81, sensitivity 0.86, specificity 0.76). This module runs the
same study on any generators of the project (``G_NC``, ``G_PC``, ``diffusion``):

- :func:`make_sequence` draws a seeded, balanced, shuffled sequence: half real images, half
  synthetic ones split evenly over the generators; the reader sees only the image
  (:func:`image_pool` and :func:`fitting_length` prepare the pools and the length);
- :class:`ReaderSession` appends each answer to the reader's CSV the moment it is given
  (``flush`` + ``fsync``: a dying kernel loses at most the click in progress) and resumes
  an existing file where it stopped;
- :func:`score_answers` gives accuracy, sensitivity (synthetic called synthetic) and
  specificity (real called real) with Wilson 95% intervals, overall and per generator;
  :func:`agreement` gives Cohen's kappa between every pair of readers of the same sequence;
- :func:`scripted_reader` answers a session from a detectability classifier
  (:func:`fit_detector` on images :func:`outside_sequence`), so the study runs headless
  (papermill, tests); :func:`cxrlib.viz.diffusion.reader_app` is the ipywidgets app for people
  in JupyterLab, :mod:`cxrlib.reader_web` the web app for readers given a link.

Answer file format (one CSV per reader and session, ``<folder>/<reader>__<session>.csv``,
UTF-8, comma-separated, header first, one row appended per answer):

==============  ==========================================================================
column          meaning
==============  ==========================================================================
``reader``      reader name as typed (letters, digits, ``-``, ``_``)
``session``     session name; one sequence per session (its seed decides the order)
``trial``       1-based position in the sequence
``image_id``    manifest id of the image shown (synthetic ids name their generator)
``generator``   ``real`` or the generator (``G_NC``, ``G_PC``, ``diffusion``); hidden from
                the reader until the end
``truth``       ``real`` or ``synthetic``
``answer``      the reader's call: ``real`` or ``synthetic``
``class_answer`` optional class the reader saw (``normal`` / ``pneumonia`` / ``covid``), or empty
``confidence``  optional 1 (guess) .. 5 (certain), or empty
``seconds``     time from showing the image to the answer
``answered_at`` UTC time stamp, ISO 8601
==============  ==========================================================================

The sequence itself is written next to it as ``<folder>/<session>__sequence.csv`` (columns
``trial, image_id, path, generator, truth, label``) so every reader of a session sees the
same images in the same order, and the study can be rescored without the manifest. The web app
(:mod:`cxrlib.reader_web`) gives each reader the session's images in an order of their own, saved
as ``<folder>/<reader>__<session>__sequence.csv``.
"""

from __future__ import annotations

import csv
import os
import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from itertools import combinations
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from cxrlib.data.manifest import resolve_path
from cxrlib.evaluate.stats import wilson_ci

REAL = "real"
SYNTHETIC = "synthetic"
ANSWERS: tuple[str, str] = (REAL, SYNTHETIC)
#: Columns of an answer file, in order (see the module docstring).
ANSWER_COLUMNS: tuple[str, ...] = ("reader", "session", "trial", "image_id", "generator", "truth", "answer",
                                   "class_answer", "confidence", "seconds", "answered_at")
SEQUENCE_COLUMNS: tuple[str, ...] = ("trial", "image_id", "path", "generator", "truth", "label")
_NAME = re.compile(r"^[A-Za-z0-9_-]+$")


# ----------------------------------------------------------------------------- sequence


def image_pool(rows: pd.DataFrame, manifest: pd.DataFrame | str | os.PathLike | None = None) -> pd.DataFrame:
    """``rows`` (manifest rows of one pool) with every ``path`` absolute, so a sequence file works
    from any folder. Manifest paths are absolute already; a relative one resolves against
    ``manifest`` when it is a folder. ``manifest`` as a frame: deprecated (a frame carries no
    folder), accepted and ignored. The other columns are kept."""
    folder = None if manifest is None or isinstance(manifest, pd.DataFrame) else manifest
    return rows.assign(path=[str(resolve_path(folder, p)) for p in rows["path"]])


def fitting_length(n_wanted: int, real: pd.DataFrame, synthetic: Mapping[str, pd.DataFrame]) -> int:
    """The longest even sequence of at most ``n_wanted`` images that :func:`make_sequence` can draw
    from these pools (half real; the synthetic half split evenly over the generators); 0 when a
    pool is empty."""
    sizes = [len(rows) for rows in synthetic.values()]
    if not sizes:
        return 0
    for n_real in range(min(int(n_wanted) // 2, len(real)), 0, -1):
        if all(share <= size for share, size in zip(_shares(n_real, len(sizes)), sizes, strict=True)):
            return 2 * n_real
    return 0


def _shares(n_synthetic: int, n_generators: int) -> np.ndarray:
    """Synthetic images per generator: as even as possible, the first generators get the extras."""
    shares = np.full(n_generators, n_synthetic // n_generators)
    shares[: n_synthetic % n_generators] += 1
    return shares


def make_sequence(real: pd.DataFrame, synthetic: Mapping[str, pd.DataFrame], *, n_images: int = 40,
                  seed: int = 0) -> pd.DataFrame:
    """A blinded, balanced, seeded sequence of ``n_images`` images (even number).

    ``real``: rows with ``image_id``, ``path`` (absolute, or relative to where the images are
    read) and optionally ``label``; ``synthetic``: ``{generator name: rows}`` likewise. Half
    the trials are real, half synthetic, the synthetic half split as evenly as possible over
    the generators (the first generators get the odd extra); images are drawn without
    replacement and the order shuffled, all from ``seed``. Raises ``ValueError`` when a pool
    is too small, naming it. Columns: :data:`SEQUENCE_COLUMNS`.
    """
    if n_images < 2 or n_images % 2:
        raise ValueError(f"n_images must be an even number >= 2, got {n_images}")
    if not synthetic:
        raise ValueError("need at least one synthetic generator")
    rng = np.random.default_rng([int(seed), 1717])
    n_real = n_images // 2
    shares = _shares(n_real, len(synthetic))
    parts = []
    for name, rows, count, truth in [(REAL, real, n_real, REAL)] + [
            (g, rows, int(k), SYNTHETIC) for (g, rows), k in zip(synthetic.items(), shares, strict=True)]:
        if len(rows) < count:
            raise ValueError(f"{name}: {len(rows)} image(s) available, the sequence needs {count}")
        picked = rows.iloc[np.sort(rng.choice(len(rows), size=count, replace=False))]
        parts.append(pd.DataFrame({
            "image_id": picked["image_id"].astype(str).to_numpy(),
            "path": picked["path"].astype(str).to_numpy(),
            "generator": name, "truth": truth,
            "label": picked["label"].astype(str).to_numpy() if "label" in picked else "",
        }))
    sequence = pd.concat(parts, ignore_index=True)
    if sequence["image_id"].duplicated().any():
        raise ValueError(f"image ids repeat across pools: {sequence['image_id'][sequence['image_id'].duplicated()].tolist()[:5]}")
    sequence = sequence.iloc[rng.permutation(len(sequence))].reset_index(drop=True)
    sequence.insert(0, "trial", np.arange(1, len(sequence) + 1))
    return sequence[list(SEQUENCE_COLUMNS)]


def _check_name(kind: str, value: str) -> str:
    value = str(value).strip()
    if not _NAME.match(value):
        raise ValueError(f"{kind} name {value!r} must be letters, digits, '-' or '_' (it becomes a file name)")
    return value


def session_paths(folder: str | os.PathLike, reader: str, session: str, *,
                  own_sequence: bool = False) -> tuple[Path, Path]:
    """``(answer file, sequence file)`` of a reader's session in ``folder``; with ``own_sequence``
    the sequence file is the reader's own (``<reader>__<session>__sequence.csv``)."""
    folder = Path(folder)
    reader, session = _check_name("reader", reader), _check_name("session", session)
    return (folder / f"{reader}__{session}.csv",
            folder / (f"{reader}__{session}__sequence.csv" if own_sequence else f"{session}__sequence.csv"))


def read_answers(path: str | os.PathLike) -> pd.DataFrame:
    """An answer file as a DataFrame (columns :data:`ANSWER_COLUMNS`); a clear error names a broken file.

    A last line cut off by a crash (fewer fields) is dropped with the rest kept.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"answer file {path} does not exist")
    with path.open(newline="", encoding="utf-8") as stream:
        rows = list(csv.reader(stream))
    if not rows or tuple(rows[0]) != ANSWER_COLUMNS:
        raise ValueError(f"{path} is not a reader-study answer file: header {rows[0] if rows else '(empty)'} "
                         f"instead of {list(ANSWER_COLUMNS)}")
    body = [row for row in rows[1:] if len(row) == len(ANSWER_COLUMNS)]
    frame = pd.DataFrame(body, columns=list(ANSWER_COLUMNS))
    bad = frame[~frame["answer"].isin(ANSWERS) | ~frame["truth"].isin(ANSWERS)]
    if len(bad):
        raise ValueError(f"{path}: trial(s) {bad['trial'].tolist()[:10]} have an answer or truth that is not "
                         f"{' / '.join(ANSWERS)}")
    frame["trial"] = frame["trial"].astype(int)
    frame["seconds"] = pd.to_numeric(frame["seconds"], errors="coerce")
    return frame


class ReaderSession:
    """One reader working through one sequence; every answer is on disk before the next image.

    ``folder``: where the answer and sequence files live; ``sequence``: from
    :func:`make_sequence` (``None``: read the session's saved sequence). A session whose
    answer file exists continues after its last answered trial (``resumed`` is True); a
    saved sequence that differs from the one given raises, so two readers of one session
    always see the same images. ``own_sequence``: this reader's sequence is kept in a file of its
    own (the web app shows every reader the session's images in an order of their own).
    """

    def __init__(self, folder: str | os.PathLike, reader: str, session: str,
                 sequence: pd.DataFrame | None = None, *, own_sequence: bool = False) -> None:
        self.reader, self.session = _check_name("reader", reader), _check_name("session", session)
        self.path, self.sequence_path = session_paths(folder, reader, session, own_sequence=own_sequence)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.sequence_path.is_file():
            saved = pd.read_csv(self.sequence_path, dtype=str, keep_default_na=False)
            saved["trial"] = saved["trial"].astype(int)
            if sequence is not None and list(saved["image_id"]) != list(sequence["image_id"].astype(str)):
                raise ValueError(f"session {session!r} already has another sequence in {self.sequence_path}; "
                                 "choose a new session name")
            self.sequence = saved
        elif sequence is None:
            raise FileNotFoundError(f"no sequence for session {session!r} ({self.sequence_path}) and none given")
        else:
            from cxrlib.runs import atomic_write

            self.sequence = sequence[list(SEQUENCE_COLUMNS)].reset_index(drop=True)
            text = self.sequence.to_csv(index=False, lineterminator="\n")
            atomic_write(self.sequence_path, lambda stream: stream.write(text), mode="w")
        self.resumed = self.path.is_file()
        if self.resumed:
            self.answers = read_answers(self.path)
        else:
            with self.path.open("x", newline="", encoding="utf-8") as stream:
                csv.writer(stream, lineterminator="\n").writerow(ANSWER_COLUMNS)
                stream.flush()
                os.fsync(stream.fileno())
            self.answers = pd.DataFrame(columns=list(ANSWER_COLUMNS))
        self._shown_at: float | None = None

    def __len__(self) -> int:
        return len(self.sequence)

    @property
    def n_answered(self) -> int:
        return int(self.answers["trial"].nunique()) if len(self.answers) else 0

    @property
    def done(self) -> bool:
        return self.current() is None

    def current(self) -> dict[str, Any] | None:
        """The next unanswered trial (a row of the sequence as a dict), or ``None`` at the end."""
        answered = set(self.answers["trial"].astype(int)) if len(self.answers) else set()
        for row in self.sequence.to_dict("records"):
            if int(row["trial"]) not in answered:
                return row
        return None

    def mark_shown(self) -> None:
        """Start the clock for the current image (``seconds`` of the next answer)."""
        self._shown_at = time.monotonic()

    def answer(self, answer: str, *, class_answer: str | None = None, confidence: int | None = None,
               seconds: float | None = None) -> dict[str, Any]:
        """Record the answer to the current trial: appended, flushed and fsynced; returns the row."""
        if answer not in ANSWERS:
            raise ValueError(f"answer must be one of {ANSWERS}, got {answer!r}")
        if confidence is not None and not 1 <= int(confidence) <= 5:
            raise ValueError(f"confidence must be 1..5, got {confidence}")
        trial = self.current()
        if trial is None:
            raise RuntimeError(f"session {self.session!r} of {self.reader!r} is complete ({len(self)} answers)")
        if seconds is None and self._shown_at is not None:
            seconds = time.monotonic() - self._shown_at
        row = {"reader": self.reader, "session": self.session, "trial": int(trial["trial"]),
               "image_id": trial["image_id"], "generator": trial["generator"], "truth": trial["truth"],
               "answer": answer, "class_answer": class_answer or "",
               "confidence": "" if confidence is None else int(confidence),
               "seconds": "" if seconds is None else round(float(seconds), 3),
               "answered_at": datetime.now(UTC).isoformat(timespec="seconds")}
        with self.path.open("a", newline="", encoding="utf-8") as stream:
            csv.writer(stream, lineterminator="\n").writerow([row[column] for column in ANSWER_COLUMNS])
            stream.flush()
            os.fsync(stream.fileno())
        self.answers = pd.concat([self.answers, pd.DataFrame([row])], ignore_index=True)
        self._shown_at = None
        return row


def prepare_image(path: str | os.PathLike, common_size: int, display_size: int = 256) -> np.ndarray:
    """The image a reader sees: ``(display_size, display_size)`` uint8.

    Read, shrunk to ``common_size`` (the smallest side among the generators compared), then
    enlarged to ``display_size``: every image has the same sharpness, so resolution does not
    give the answer away.
    """
    from cxrlib.data.io import read_image
    from cxrlib.data.transforms import resize_image

    return resize_image(resize_image(read_image(path), common_size), display_size)


# ----------------------------------------------------------------------------- scores


@dataclass(frozen=True)
class Rate:
    """``k`` of ``n`` with its Wilson 95% interval."""

    k: int
    n: int

    @property
    def value(self) -> float:
        return self.k / self.n if self.n else float("nan")

    @property
    def ci95(self) -> tuple[float, float]:
        return wilson_ci(self.k, self.n)


def score_answers(answers: pd.DataFrame) -> dict[str, Any]:
    """Accuracy, sensitivity (synthetic called synthetic), specificity (real called real), per generator.

    ``answers``: rows of one or more answer files. Returns ``accuracy``, ``sensitivity``,
    ``specificity`` (floats), each with ``_ci95`` (Wilson ``(low, high)``) and ``_n``, and
    ``per_generator``: ``{generator: {"rate", "ci95", "n", "measure"}}`` where a synthetic
    generator's rate is its sensitivity (share of its images called synthetic) and
    ``real``'s is the specificity. Empty answers give NaN.

    What they can show: whether readers (or a classifier) tell these synthetic images from
    real ones, and which generator gives itself away. What they cannot show: more than the
    images of this sequence at their display size; with 40 images the intervals are wide
    (about +-0.15 on accuracy).
    """
    truth = answers["truth"].astype(str).to_numpy()
    called = answers["answer"].astype(str).to_numpy()
    correct = truth == called
    rates = {
        "accuracy": Rate(int(correct.sum()), len(correct)),
        "sensitivity": Rate(int((correct & (truth == SYNTHETIC)).sum()), int((truth == SYNTHETIC).sum())),
        "specificity": Rate(int((correct & (truth == REAL)).sum()), int((truth == REAL).sum())),
    }
    result: dict[str, Any] = {}
    for name, rate in rates.items():
        result.update({name: rate.value, f"{name}_ci95": rate.ci95, f"{name}_n": rate.n})
    per_generator = {}
    for generator, group in answers.groupby(answers["generator"].astype(str), sort=True):
        hits = group["answer"].astype(str) == group["truth"].astype(str)
        rate = Rate(int(hits.sum()), len(group))
        per_generator[generator] = {"rate": rate.value, "ci95": rate.ci95, "n": rate.n,
                                    "measure": "specificity" if generator == REAL else "sensitivity"}
    result["per_generator"] = per_generator
    return result


def score_table(answers: pd.DataFrame) -> pd.DataFrame:
    """One row per reader (and ``all readers``): accuracy / sensitivity / specificity with intervals."""
    rows = []
    groups = [(reader, group) for reader, group in answers.groupby("reader", sort=True)]
    if len(groups) > 1:
        groups.append(("all readers", answers))
    for reader, group in groups:
        scores = score_answers(group)
        row: dict[str, Any] = {"reader": reader, "n": len(group)}
        for name in ("accuracy", "sensitivity", "specificity"):
            low, high = scores[f"{name}_ci95"]
            row.update({name: scores[name], f"{name}_low": low, f"{name}_high": high})
        for generator, values in scores["per_generator"].items():
            row[f"{values['measure']}_{generator}"] = values["rate"]
        rows.append(row)
    return pd.DataFrame(rows)


def agreement(answers: pd.DataFrame) -> pd.DataFrame:
    """Cohen's kappa (``sklearn.metrics.cohen_kappa_score``) for every pair of readers.

    Pairs are compared on the images both answered (per session and image id). Columns:
    ``reader_a, reader_b, n_common, kappa``; an empty frame with fewer than two readers.
    Kappa 1: perfect agreement, 0: agreement no better than chance; NaN when one reader
    gave a single answer throughout.
    """
    from sklearn.metrics import cohen_kappa_score

    columns = ["reader_a", "reader_b", "n_common", "kappa"]
    keyed = answers.assign(key=answers["session"].astype(str) + "/" + answers["image_id"].astype(str))
    readers = sorted(keyed["reader"].astype(str).unique())
    rows = []
    for a, b in combinations(readers, 2):
        left = keyed[keyed["reader"] == a].drop_duplicates("key", keep="last").set_index("key")["answer"]
        right = keyed[keyed["reader"] == b].drop_duplicates("key", keep="last").set_index("key")["answer"]
        common = left.index.intersection(right.index)
        kappa = float("nan")
        if len(common) and len(set(left[common]) | set(right[common])) > 1:
            import warnings

            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                kappa = float(cohen_kappa_score(left[common], right[common]))
        rows.append({"reader_a": a, "reader_b": b, "n_common": len(common), "kappa": kappa})
    return pd.DataFrame(rows, columns=columns)


def collect_answers(folder: str | os.PathLike, session: str | None = None) -> tuple[pd.DataFrame, list[str]]:
    """Every answer file in ``folder`` (optionally of one session) in one frame, and the files that
    could not be read (``"<path>: <error>"``), which are skipped."""
    frames, problems = [], []
    pattern = f"*__{session}.csv" if session else "*__*.csv"
    for path in sorted(Path(folder).glob(pattern)):
        if path.name.endswith("__sequence.csv"):
            continue
        try:
            frames.append(read_answers(path))
        except (ValueError, OSError) as exc:
            problems.append(f"{path}: {exc}")
    answers = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=list(ANSWER_COLUMNS))
    return answers, problems


# ----------------------------------------------------------------------------- scripted reader


def fit_detector(real_feats: np.ndarray, synthetic_feats: np.ndarray, *, seed: int = 0) -> Any:
    """The detectability probe of :func:`cxrlib.evaluate.synthesis.detectability_auc`, fitted once:
    standardised features + logistic regression, label 1 = synthetic. Fit it on images that are
    NOT in the reader sequence (e.g. real training images and other synthetic images)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    features = np.concatenate([np.asarray(real_feats, float), np.asarray(synthetic_feats, float)])
    labels = np.concatenate([np.zeros(len(real_feats), int), np.ones(len(synthetic_feats), int)])
    if len(np.unique(labels)) < 2:
        raise ValueError("the detector needs real and synthetic examples")
    return make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000, random_state=seed)).fit(features, labels)


def outside_sequence(sequence: pd.DataFrame, image_sets: Sequence[tuple[pd.DataFrame, np.ndarray]]) -> np.ndarray:
    """The images of ``image_sets`` that the reader is not shown, stacked: what a scripted reader's
    detector may learn from. Each set is ``(rows, images)`` with one manifest row (``image_id``)
    per image, in order; an image whose id is in ``sequence`` is left out."""
    shown = set(sequence["image_id"].astype(str))
    kept = []
    for rows, images in image_sets:
        if len(rows) != len(images):
            raise ValueError(f"{len(rows)} rows for {len(images)} images")
        kept.append(np.asarray(images)[~rows["image_id"].astype(str).isin(shown).to_numpy()])
    if not kept:
        raise ValueError("no image sets given")
    return np.concatenate(kept)


def scripted_reader(session: ReaderSession, probability: Callable[[Sequence[dict[str, Any]]], np.ndarray], *,
                    threshold: float = 0.5) -> pd.DataFrame:
    """Answer every remaining trial of ``session`` from a classifier; returns the session's answers.

    ``probability(trials)``: the probability that each trial's image is synthetic (e.g. a
    :func:`fit_detector` probe on feature-network features). ``>= threshold`` answers
    synthetic; the confidence is ``1 + round(8 * |p - 0.5|)`` (1 at 0.5, 5 at 0 or 1). Each
    answer goes through :meth:`ReaderSession.answer`, so the file is the same as a person's.
    """
    remaining = [row for row in session.sequence.to_dict("records")
                 if int(row["trial"]) not in set(session.answers["trial"].astype(int))]
    if not remaining:
        return session.answers
    probs = np.asarray(probability(remaining), dtype=float).ravel()
    if len(probs) != len(remaining):
        raise ValueError(f"probability returned {len(probs)} values for {len(remaining)} trials")
    for p in probs:
        session.answer(SYNTHETIC if p >= threshold else REAL, confidence=int(1 + round(8 * abs(p - 0.5))),
                       seconds=0.0)
    return session.answers
