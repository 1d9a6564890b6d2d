"""Adapters that turn public chest X-ray datasets, as downloaded, into manifests.

Every adapter reads a dataset folder in its published layout, never changes or copies a
file, and returns a manifest (:mod:`cxrlib.data.manifest` schema) whose paths are absolute
(under that folder). Labels are normalised to the project's class names
(:data:`CANONICAL_LABELS`), so that manifests from several sources can be concatenated.

Adding a dataset: subclass :class:`DatasetAdapter`, set ``name``, implement
:meth:`~DatasetAdapter.rows` (one dict per image) and register the class in
:data:`ADAPTERS`; the base class fills the schema, makes the paths absolute and validates.

=======================  =================================================================
``covid19-radiography``  :class:`Covid19RadiographyDatabase` (Kaggle, 21,165 PNG images,
                         lung masks for every image)
``ieee8023``             :class:`CovidChestXrayDataset` (Cohen et al., COVID-19 image data
                         collection: ``metadata.csv`` + ``images/``)
``nih-cxr14``            :class:`NIHChestXray14` (112,120 frontal images, 14 findings)
``kermany``              :class:`KermanyPediatricPneumonia` (Guangzhou, 5,856 paediatric)
``chexpert``             :class:`CheXpert` (Stanford, 224,316 images, 14 observations)
``montgomery``           :class:`MontgomeryTB` (138 images, left / right lung masks)
``shenzhen``             :class:`ShenzhenTB` (662 images)
``jsrt``                 :class:`JSRT` (247 raw 12-bit images, SCR lung / heart masks)
``zunair2021``           :class:`ZunairSyntheticCovid` (21,295 CycleGAN-made COVID-19 CXRs)
``image-folder``         :class:`ImageFolderDataset` (``<root>/<class>/*.png|jpg``)
=======================  =================================================================

Rows an adapter cannot use (a missing image file, an empty required value) are skipped,
listed in :attr:`DatasetAdapter.skipped` (file, row, reason) and announced by one
warning, so one bad row does not stop a whole dataset; a table that cannot be read, or
lacks a column the adapter needs, raises :class:`DatasetFormatError` naming the file.
Patient ids are prefixed with the source name (``ieee8023:17``), so they never collide
across sources.
"""

from __future__ import annotations

import os
import re
import warnings
from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pandas as pd

from cxrlib.data import manifest as mf

#: Class names used across the project (phantom and real data alike).
CANONICAL_LABELS: tuple[str, ...] = ("normal", "pneumonia", "covid", "lung_opacity")
#: File name endings read as images (compared in lower case).
IMAGE_SUFFIXES: tuple[str, ...] = (".png", ".jpg", ".jpeg")


def name_key(raw: str) -> str:
    """``"Viral Pneumonia"`` -> ``"viral_pneumonia"``: lower case, runs of space / ``-`` -> ``_``."""
    return re.sub(r"[\s\-]+", "_", str(raw).strip().lower())


def normalize_label(raw: str, aliases: Mapping[str, str]) -> str:
    """Map a dataset's class name to a canonical label via ``aliases`` (keys as :func:`name_key` gives).

    Raises ``ValueError`` naming the unknown class and the known ones, so a new class in a
    new release of a dataset is not silently dropped or mislabelled.
    """
    key = name_key(raw)
    if key not in aliases:
        raise ValueError(f"unknown class {raw!r}; known: {sorted(set(aliases))}")
    return aliases[key]


def _image_files(folder: Path) -> list[Path]:
    """Image files directly in ``folder``, sorted by name (hidden files skipped)."""
    return sorted(
        p for p in folder.iterdir()
        if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_SUFFIXES
    )


class DatasetFormatError(ValueError):
    """A dataset file that cannot be used as published: unreadable table, missing column, ..."""


@dataclass
class SkippedRow:
    """One row (or file) an adapter left out of its manifest, and why."""

    file: str
    row: str
    reason: str
    #: ``"bad"`` (unusable: missing file, empty value, ...) or ``"excluded"`` (by design,
    #: e.g. a CT row of a collection read for X-rays); only bad rows trigger the warning.
    kind: str = "bad"


def read_table(path: Path, required: Sequence[str], *, dataset: str) -> pd.DataFrame:
    """A dataset's CSV as strings (missing -> ``""``); raises :class:`DatasetFormatError`
    naming the file when it is missing, unreadable or lacks a column of ``required``."""
    if not path.is_file():
        raise DatasetFormatError(f"{dataset}: {path} not found (is this the dataset folder?)")
    try:
        table = pd.read_csv(path, dtype=str, keep_default_na=False, na_filter=False,
                            encoding="utf-8-sig")
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as error:
        raise DatasetFormatError(f"{dataset}: cannot read {path} as CSV: {error}") from None
    table.columns = [str(column).strip() for column in table.columns]
    missing = [column for column in required if column not in table.columns]
    if missing:
        raise DatasetFormatError(
            f"{dataset}: {path} lacks column(s) {', '.join(map(repr, missing))} "
            f"(found: {', '.join(map(repr, table.columns))})"
        )
    return table


#: Raw view names (normalised by :func:`name_key`) -> project view; the raw value is kept too.
VIEWS: dict[str, str] = {
    "pa": "PA", "posteroanterior": "PA",
    "ap": "AP", "ap_supine": "AP", "ap_erect": "AP", "aps": "AP", "ap_semi_erect": "AP",
    "anteroposterior": "AP", "supine": "AP",
    "l": "L", "ll": "L", "lateral": "L", "lat": "L", "rl": "L",
}


def normalize_view(raw: str) -> str:
    """``"AP Supine"`` -> ``"AP"``, ``"PA"`` -> ``"PA"``, ``"L"`` / ``"Lateral"`` -> ``"L"``;
    blank, ``"?"`` and unknown values -> ``""`` (the raw value stays in ``view_raw``)."""
    return VIEWS.get(name_key(raw), "")


class DatasetAdapter(ABC):
    """A public dataset in its published folder layout; :meth:`manifest` describes its images.

    ``root`` is the dataset folder; it is only read. Subclasses set :attr:`name` and
    implement :meth:`rows`.
    """

    #: Short registry name, also used as the manifest's ``source`` value.
    name: ClassVar[str] = ""
    #: Reference metadata, rendered into docs/references.md by :mod:`cxrlib.references`
    #: (the one place a dataset's citation and terms are written): full name, how to
    #: cite it, its license or terms of use, where to get it.
    title: ClassVar[str] = ""
    citation: ClassVar[str] = ""
    license: ClassVar[str] = ""
    url: ClassVar[str] = ""

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root).expanduser().resolve()
        if not self.root.is_dir():
            raise FileNotFoundError(f"{type(self).__name__}: dataset folder {self.root} does not exist")
        #: Rows left out by the last :meth:`manifest` call (file, row, reason).
        self.skipped: list[SkippedRow] = []

    def _skip(self, file: str | os.PathLike, row: Any, reason: str, *, kind: str = "bad") -> None:
        """Record a row :meth:`rows` leaves out; :meth:`manifest` warns about the bad ones."""
        self.skipped.append(SkippedRow(file=str(file), row=str(row), reason=reason, kind=kind))

    def skipped_frame(self) -> pd.DataFrame:
        """:attr:`skipped` as a table (``source, file, row, reason, kind``), for reports."""
        return pd.DataFrame(
            [{"source": self.name, **vars(item)} for item in self.skipped],
            columns=["source", "file", "row", "reason", "kind"],
        )

    @abstractmethod
    def rows(self) -> Iterable[dict[str, Any]]:
        """One dict per image with manifest columns; paths relative to :attr:`root` (POSIX)."""

    def manifest(self) -> pd.DataFrame:
        """The dataset's manifest: schema columns first, all values strings, validated.

        Paths are absolute (:attr:`root` joined with :meth:`rows`' relative paths). ``split``
        is ``""`` (split later, by patient).
        """
        self.skipped = []
        records = list(self.rows())
        bad = [item for item in self.skipped if item.kind == "bad"]
        if bad:
            listed = mf._listing(f"{Path(item.file).name} {item.row} ({item.reason})" for item in bad)
            warnings.warn(
                f"{type(self).__name__}: skipped {len(bad)} unusable rows under {self.root}: {listed}",
                UserWarning,
                stacklevel=2,
            )
        if not records:
            raise ValueError(f"{type(self).__name__}: no images found under {self.root}")
        df = pd.DataFrame(records)
        for column in mf.COLUMNS:
            if column not in df.columns:
                df[column] = ""
        extras = [c for c in df.columns if c not in mf.COLUMNS]
        df = df[[*mf.COLUMNS, *extras]].fillna("").astype(str)
        return mf.validate(mf.absolute_paths(df, self.root), labels=self.declared_labels(df))

    def declared_labels(self, df: pd.DataFrame) -> tuple[str, ...]:
        """The labels this adapter may give (:data:`cxrlib.data.manifest.LABELS`)."""
        return mf.LABELS

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.root)!r})"


class Covid19RadiographyDatabase(DatasetAdapter):
    """COVID-19 Radiography Database (Kaggle), with its lung masks.

    - **Size** (release 4, the current one): 21,165 posterior-anterior chest X-rays as
      299x299 8-bit PNG: 3,616 COVID-19, 10,192 Normal, 6,012 Lung_Opacity (non-COVID lung
      infection) and 1,345 Viral Pneumonia. Every image has a lung mask, a 256x256 PNG
      (0 background, 255 both lungs together) of the same name: images and masks differ
      in size and must be brought to one grid together.
    - **Layout**: ``<root>/<Class>/images/<Class>-<n>.png`` and
      ``<root>/<Class>/masks/<Class>-<n>.png`` with ``<Class>`` in ``COVID``, ``Normal``,
      ``Lung_Opacity``, ``Viral Pneumonia``, plus ``<Class>.metadata.xlsx`` files naming
      the original source of each image (not read here). Older releases kept the images
      directly in ``<root>/<Class>/``, without masks; that layout is read too. Give the
      folder that holds the class folders (the archive unpacks to
      ``COVID-19_Radiography_Dataset/``; that wrapper folder is also accepted).
    - **Labels**, from the class folder: ``covid``, ``normal``, ``lung_opacity``,
      ``pneumonia`` (Viral Pneumonia).
    - **Patients**: the dataset has **no patient ids**, so ``patient_id`` is the image id.
      Several images of one patient may therefore land in different splits; exact copies
      are caught by content hashes (:func:`cxrlib.data.manifest.add_content_hashes` groups
      them), near copies (follow-up studies) are not.
    - **Sources**: images are collected from several public collections (e.g. the Viral
      Pneumonia images are paediatric, from Guangzhou; Normal from RSNA and Guangzhou), so
      class and source are entangled: a classifier can learn the source.
    - **Citation**: M.E.H. Chowdhury et al., "Can AI help in screening viral and COVID-19
      pneumonia?", IEEE Access 8, 132665-132676 (2020); T. Rahman et al., "Exploring the
      effect of image enhancement techniques on COVID-19 detection using chest X-ray
      images", Computers in Biology and Medicine 132, 104319 (2021).
    - **License**: CC BY 4.0 as stated by the database (each source collection keeps its
      own terms).
    - **Download**: https://www.kaggle.com/datasets/tawsifurrahman/covid19-radiography-database

    Manifest rows: ``image_id`` = file stem (e.g. ``COVID-1``), ``path`` =
    ``<Class>/images/<file>``, ``label`` as above, ``patient_id`` = ``image_id``,
    ``source`` = ``covid19-radiography``, ``view`` = ``""``, ``split`` = ``""``,
    ``mask_path`` = the union lung mask (``""`` when the image has none), ``origin`` =
    ``real``. Left and right lungs are recovered from the union mask by connected
    components (:func:`cxrlib.data.masks.split_union_lung_mask`).
    """

    name: ClassVar[str] = "covid19-radiography"
    title: ClassVar[str] = "COVID-19 Radiography Database (Kaggle)"
    citation: ClassVar[str] = ('M.E.H. Chowdhury et al., "Can AI help in screening viral and '
                               'COVID-19 pneumonia?", IEEE Access 8, 132665-132676 (2020); T. '
                               'Rahman et al., "Exploring the effect of image enhancement '
                               'techniques on COVID-19 detection using chest X-ray images", '
                               "Computers in Biology and Medicine 132, 104319 (2021)")
    license: ClassVar[str] = ("CC BY 4.0 as stated by the database; its images come from other "
                              "public collections, each of which keeps its own terms (mixed)")
    url: ClassVar[str] = "https://www.kaggle.com/datasets/tawsifurrahman/covid19-radiography-database"
    #: Class folder (normalised by :func:`name_key`) -> canonical label.
    LABELS: ClassVar[dict[str, str]] = {
        "covid": "covid",
        "covid_19": "covid",
        "normal": "normal",
        "viral_pneumonia": "pneumonia",
        "lung_opacity": "lung_opacity",
    }
    #: Name of the folder the Kaggle archive unpacks to.
    ARCHIVE_FOLDER: ClassVar[str] = "COVID-19_Radiography_Dataset"

    def __init__(self, root: str | os.PathLike) -> None:
        super().__init__(root)
        if not self._class_folders() and (self.root / self.ARCHIVE_FOLDER).is_dir():
            self.root = self.root / self.ARCHIVE_FOLDER
        if not self._class_folders():
            raise FileNotFoundError(
                f"{self.root} holds none of the class folders of the COVID-19 Radiography Database "
                "(COVID, Normal, Lung_Opacity, Viral Pneumonia)"
            )

    def _class_folders(self) -> list[Path]:
        return sorted(
            p for p in self.root.iterdir() if p.is_dir() and name_key(p.name) in self.LABELS
        )

    def rows(self) -> Iterable[dict[str, Any]]:
        for class_folder in self._class_folders():
            label = normalize_label(class_folder.name, self.LABELS)
            image_folder = class_folder / "images"
            if not image_folder.is_dir():  # releases before v4: images directly in the class folder
                image_folder = class_folder
            mask_folder = class_folder / "masks"
            masks = {p.stem: p for p in _image_files(mask_folder)} if mask_folder.is_dir() else {}
            for image in _image_files(image_folder):
                mask = masks.get(image.stem)
                yield {
                    "image_id": image.stem,
                    "path": image.relative_to(self.root).as_posix(),
                    "label": label,
                    "patient_id": image.stem,
                    "source": self.name,
                    "view": "",
                    "split": "",
                    "mask_path": mask.relative_to(self.root).as_posix() if mask else "",
                    "origin": mf.REAL,
                }


def _csv_line(index: int) -> str:
    """A table row's position as a person finds it in the file (header = line 1)."""
    return f"line {index + 2}"


def _prefixed(source: str, patient: str) -> str:
    """``ieee8023`` + ``17`` -> ``ieee8023:17``: patient ids never collide across sources."""
    return f"{source}:{str(patient).strip()}"


def _first_existing(candidates: Iterable[Path], test) -> Path | None:
    for candidate in candidates:
        if test(candidate):
            return candidate
    return None


class CovidChestXrayDataset(DatasetAdapter):
    """COVID-19 image data collection ("covid-chestxray-dataset", ieee8023 on GitHub).

    - **Size** (final release, 2020-2021): ~950 images of ~480 patients, X-ray and CT;
      about 580 X-rays with a COVID-19 finding, the rest other pneumonias (SARS, MERS,
      bacterial, fungal), ARDS, "No Finding" and unlabeled ``todo`` rows. Images come from
      publications and websites in many sizes and formats (PNG, JPEG; grayscale and RGB).
    - **Layout**: ``<root>/metadata.csv`` (one row per image: ``patientid, offset, sex,
      age, finding, ..., view, modality, date, location, folder, filename, doi, url,
      license, clinical_notes, other_notes``) and ``<root>/images/<filename>`` (the
      ``folder`` column names the image folder; CT volumes live in ``volumes/``).
    - **Labels**, from ``finding`` (kept raw in column ``finding``): older releases write
      flat findings (``COVID-19``, ``COVID-19, ARDS``, ``SARS``, ``Streptococcus``),
      newer ones hierarchical ones (``Pneumonia/Viral/COVID-19``,
      ``Pneumonia/Bacterial/Streptococcus``); both map to ``covid`` when any part is
      COVID-19 / SARS-CoV-2, to ``pneumonia`` for other infectious pneumonias, ``normal``
      for ``No Finding``, ``unknown`` for ``todo`` / ``Unknown`` / blank and ``other``
      for the rest (ARDS alone, lipoid pneumonia, ...). Recipes filter on ``finding``.
    - **Views**: ``PA``, ``AP``, ``AP Supine``, ``AP Erect``, ``L``; ``view`` is
      normalised by :func:`normalize_view` (``AP Supine`` -> ``AP``, lateral -> ``L``,
      blank / ``?`` -> ``""``) and the raw value kept in ``view_raw``. Supine films come
      from bed-bound, sicker patients: view and severity are entangled.
    - **Patients**: ``patientid`` (several follow-up images per patient, ``offset`` =
      days since symptom onset), prefixed: ``ieee8023:<patientid>``.
    - **Sources**: dozens of hospitals and journals; a classifier can learn source
      (burned-in text, crops, JPEG quality) instead of disease.
    - **Citation**: J.P. Cohen, P. Morrison, L. Dao, K. Roth, T.Q. Duong, M. Ghassemi,
      "COVID-19 image data collection: Prospective predictions are the future", Machine
      Learning for Biomedical Imaging 1 (2020).
    - **License**: per image, column ``license`` (CC BY, CC BY-NC-SA, ... or blank when
      unknown); kept in the manifest so a user can filter by it.
    - **Download**: https://github.com/ieee8023/covid-chestxray-dataset

    Only ``modality == "X-ray"`` rows are read (CT rows are listed in :attr:`skipped`
    as excluded). Rows whose image file is missing, or whose ``filename`` / ``patientid``
    is empty, are skipped and listed. ``image_id`` is the file name.
    """

    name: ClassVar[str] = "ieee8023"
    title: ClassVar[str] = ('COVID-19 image data collection ("covid-chestxray-dataset", '
                            "ieee8023)")
    citation: ClassVar[str] = ("J.P. Cohen, P. Morrison, L. Dao, K. Roth, T.Q. Duong, M. "
                               'Ghassemi, "COVID-19 image data collection: Prospective '
                               'predictions are the future", Machine Learning for Biomedical '
                               "Imaging 1 (2020)")
    license: ClassVar[str] = ("mixed, per image (column license of metadata.csv, kept in the "
                              "manifest): CC BY, CC BY-SA, CC BY-NC-SA, CC BY-NC-ND "
                              "(non-commercial, no derivatives) and others, blank where "
                              "unknown; check each image's license before reuse")
    url: ClassVar[str] = "https://github.com/ieee8023/covid-chestxray-dataset"
    METADATA: ClassVar[str] = "metadata.csv"
    REQUIRED: ClassVar[tuple[str, ...]] = ("patientid", "finding", "view", "modality", "filename")
    #: Extra columns carried into the manifest when present.
    KEEP: ClassVar[tuple[str, ...]] = ("offset", "sex", "age", "date", "location", "license", "doi", "url")
    COVID_PARTS: ClassVar[frozenset[str]] = frozenset({"covid_19", "covid19", "covid", "sars_cov_2"})
    PNEUMONIA_PARTS: ClassVar[frozenset[str]] = frozenset({
        "pneumonia", "viral", "bacterial", "fungal", "sars", "mers", "mers_cov", "influenza",
        "pneumocystis", "streptococcus", "klebsiella", "e.coli", "e_coli", "varicella",
        "mycoplasma_bacterial_pneumonia", "mycoplasma", "legionella", "chlamydophila",
        "staphylococcus_aureus", "aspergillosis", "nocardia", "herpes", "h1n1", "tuberculosis",
    })

    @classmethod
    def label_of(cls, finding: str) -> str:
        """``finding`` (flat or hierarchical) -> ``covid`` / ``pneumonia`` / ``normal`` /
        ``unknown`` / ``other``."""
        whole = name_key(finding)
        parts = [name_key(part) for part in re.split(r"[/,;]", str(finding)) if part.strip()]
        if any(part in cls.COVID_PARTS for part in parts):
            return "covid"
        if whole in ("no_finding", "normal"):
            return "normal"
        if whole in ("", "todo", "unknown"):
            return "unknown"
        if (parts and parts[0] == "pneumonia") or any(p in cls.PNEUMONIA_PARTS for p in parts):
            return "pneumonia"
        return "other"

    def rows(self) -> Iterable[dict[str, Any]]:
        csv_path = self.root / self.METADATA
        table = read_table(csv_path, self.REQUIRED, dataset=self.name)
        seen: dict[str, str] = {}
        for index, record in table.iterrows():
            line = _csv_line(int(index))
            modality = record["modality"].strip()
            if name_key(modality) not in ("x_ray", "xray", "cxr"):
                self._skip(csv_path, line, f"excluded: modality {modality!r} (X-ray only)", kind="excluded")
                continue
            filename, patient = record["filename"].strip(), record["patientid"].strip()
            if not filename or not patient:
                self._skip(csv_path, line, "empty filename" if not filename else "empty patientid")
                continue
            folder = record.get("folder", "").strip() or "images"
            relative = f"{folder}/{filename}"
            if relative in seen:
                self._skip(csv_path, line, f"{relative} already listed on {seen[relative]}")
                continue
            if not (self.root / relative).is_file():
                self._skip(csv_path, line, f"image file {relative} not found")
                continue
            seen[relative] = line
            finding = record["finding"].strip()
            yield {
                "image_id": filename,
                "path": relative,
                "label": self.label_of(finding),
                "patient_id": _prefixed(self.name, patient),
                "source": self.name,
                "view": normalize_view(record["view"]),
                "origin": mf.REAL,
                "finding": finding,
                "view_raw": record["view"].strip(),
                **{column: record[column].strip() for column in self.KEEP if column in table.columns},
            }


class NIHChestXray14(DatasetAdapter):
    """NIH ChestX-ray14 (ChestX-ray8 extended), NIH Clinical Center.

    - **Size**: 112,120 frontal chest X-rays (1024x1024 8-bit PNG) of 30,805 patients;
      60,361 ``No Finding``, 1,431 with ``Pneumonia`` among 14 text-mined findings
      (Atelectasis, Cardiomegaly, Effusion, Infiltration, Mass, Nodule, Pneumonia,
      Pneumothorax, Consolidation, Edema, Emphysema, Fibrosis, Pleural_Thickening,
      Hernia). Labels were mined from reports by NLP (estimated >90% accurate).
    - **Layout**: ``<root>/Data_Entry_2017.csv`` (or ``Data_Entry_2017_v2020.csv``;
      columns ``Image Index, Finding Labels, Follow-up #, Patient ID, Patient Age,
      Patient Gender, View Position, ...``) and the images in ``<root>/images/`` or, as
      published in 12 archives, ``<root>/images_001/images/`` ... ``images_012/images/``.
    - **Labels**, from ``Finding Labels`` (pipe-separated, e.g. ``Effusion|Pneumonia``;
      kept raw in column ``finding``): ``normal`` for ``No Finding``, ``pneumonia`` when
      ``Pneumonia`` is among the findings, ``other`` otherwise.
    - **Views**: ``View Position`` (``PA`` / ``AP``), raw value in ``view_raw``.
    - **Patients**: ``Patient ID`` (``Follow-up #`` numbers the studies), prefixed:
      ``nih-cxr14:<id>``.
    - **Citation**: X. Wang, Y. Peng, L. Lu, Z. Lu, M. Bagheri, R.M. Summers,
      "ChestX-ray8: Hospital-scale chest X-ray database and benchmarks on weakly-supervised
      classification and localization of common thorax diseases", CVPR 2017.
    - **License**: free use without restriction as stated by the NIH Clinical Center;
      cite the paper and acknowledge the NIH Clinical Center.
    - **Download**: https://nihcc.app.box.com/v/ChestXray-NIHCC (also on Kaggle as
      ``nih-chest-xrays/data``).

    Rows whose image is not in any image folder are skipped and listed (normal when only
    some of the 12 archives were downloaded).
    """

    name: ClassVar[str] = "nih-cxr14"
    title: ClassVar[str] = "NIH ChestX-ray14 (NIH Clinical Center)"
    citation: ClassVar[str] = ("X. Wang, Y. Peng, L. Lu, Z. Lu, M. Bagheri, R.M. Summers, "
                               '"ChestX-ray8: Hospital-scale chest X-ray database and '
                               "benchmarks on weakly-supervised classification and localization "
                               'of common thorax diseases", CVPR 2017')
    license: ClassVar[str] = ("free use without restriction as stated by the NIH Clinical "
                              "Center; cite the paper and acknowledge the NIH Clinical Center")
    url: ClassVar[str] = "https://nihcc.app.box.com/v/ChestXray-NIHCC"
    LABEL_FILES: ClassVar[tuple[str, ...]] = ("Data_Entry_2017.csv", "Data_Entry_2017_v2020.csv")
    REQUIRED: ClassVar[tuple[str, ...]] = ("Image Index", "Finding Labels", "Patient ID", "View Position")
    KEEP: ClassVar[dict[str, str]] = {"Follow-up #": "follow_up", "Patient Age": "age", "Patient Gender": "sex"}

    def _image_index(self) -> dict[str, str]:
        """File name -> path relative to the root, over ``images/`` and ``images_NNN/images/``."""
        folders = [self.root / "images", *sorted(self.root.glob("images_*/images")),
                   *sorted(p for p in self.root.glob("images_*") if p.is_dir())]
        index: dict[str, str] = {}
        for folder in folders:
            if folder.is_dir():
                for file in _image_files(folder):
                    index.setdefault(file.name, file.relative_to(self.root).as_posix())
        return index

    def rows(self) -> Iterable[dict[str, Any]]:
        csv_path = _first_existing((self.root / n for n in self.LABEL_FILES), Path.is_file)
        table = read_table(csv_path or self.root / self.LABEL_FILES[0], self.REQUIRED, dataset=self.name)
        files = self._image_index()
        seen: set[str] = set()
        for index, record in table.iterrows():
            line = _csv_line(int(index))
            image, patient = record["Image Index"].strip(), record["Patient ID"].strip()
            if not image or not patient:
                self._skip(csv_path, line, "empty Image Index" if not image else "empty Patient ID")
                continue
            if image in seen:
                self._skip(csv_path, line, f"{image} listed twice")
                continue
            if image not in files:
                self._skip(csv_path, line, f"image file {image} not found under images/ or images_*/images/")
                continue
            seen.add(image)
            findings = [part.strip() for part in record["Finding Labels"].split("|") if part.strip()]
            label = ("normal" if findings == ["No Finding"]
                     else "pneumonia" if "Pneumonia" in findings else "other")
            yield {
                "image_id": Path(image).stem,
                "path": files[image],
                "label": label,
                "patient_id": _prefixed(self.name, patient.lstrip("0") or "0"),
                "source": self.name,
                "view": normalize_view(record["View Position"]),
                "origin": mf.REAL,
                "finding": record["Finding Labels"].strip(),
                "view_raw": record["View Position"].strip(),
                **{new: record[old].strip() for old, new in self.KEEP.items() if old in table.columns},
            }


class KermanyPediatricPneumonia(DatasetAdapter):
    """Guangzhou paediatric pneumonia chest X-rays (Kermany et al., "chest_xray").

    - **Size**: 5,856 anterior-posterior chest X-rays (JPEG, various sizes) of children
      aged 1-5 from Guangzhou Women and Children's Medical Center: 1,583 normal,
      4,273 pneumonia (bacterial and viral).
    - **Layout**: ``<root>/{train,val,test}/{NORMAL,PNEUMONIA}/*.jpeg`` (the Kaggle
      archive unpacks to ``chest_xray/``, the Mendeley one to ``CellData/chest_xray/``;
      both wrappers are accepted). File names: ``person<P>_bacteria_<n>.jpeg`` /
      ``person<P>_virus_<n>.jpeg`` (pneumonia), ``IM-<P>-<n>.jpeg`` and
      ``NORMAL2-IM-<P>-<n>.jpeg`` (normal).
    - **Labels**: ``normal`` / ``pneumonia`` from the class folder; ``finding`` =
      ``normal``, ``bacteria`` or ``virus`` from the file name.
    - **Patients**: ``person<P>`` or ``IM-<P>`` from the file name, prefixed
      (``kermany:person1``). ``NORMAL2-IM-<P>`` is taken as the same patient as
      ``IM-<P>``: grouping two people is harmless, splitting one is not. A file name in
      none of these patterns gets its own patient id (the image id).
    - **Split**: the published train / val / test split (val has only 16 images) is kept
      in ``published_split``; the project splits by patient itself.
    - **Citation**: D.S. Kermany et al., "Identifying medical diagnoses and treatable
      diseases by image-based deep learning", Cell 172(5), 1122-1131 (2018).
    - **License**: CC BY 4.0 (Mendeley Data).
    - **Download**: https://data.mendeley.com/datasets/rscbjbr9sj/2 or
      https://www.kaggle.com/datasets/paultimothymooney/chest-xray-pneumonia
    """

    name: ClassVar[str] = "kermany"
    title: ClassVar[str] = "Guangzhou paediatric pneumonia chest X-rays (Kermany et al. 2018)"
    citation: ClassVar[str] = ('D.S. Kermany et al., "Identifying medical diagnoses and '
                               'treatable diseases by image-based deep learning", Cell 172(5), '
                               "1122-1131 (2018)")
    license: ClassVar[str] = "CC BY 4.0 (Mendeley Data)"
    url: ClassVar[str] = "https://data.mendeley.com/datasets/rscbjbr9sj/2"
    SPLITS: ClassVar[tuple[str, ...]] = ("train", "val", "test")
    LABELS: ClassVar[dict[str, str]] = {"normal": "normal", "pneumonia": "pneumonia"}
    PERSON: ClassVar[re.Pattern] = re.compile(r"^person(\d+)_(bacteria|virus)_\d+", re.IGNORECASE)
    NORMAL: ClassVar[re.Pattern] = re.compile(r"^(?:NORMAL\d*-)?IM-(\d+)-\d+", re.IGNORECASE)

    def __init__(self, root: str | os.PathLike) -> None:
        super().__init__(root)
        found = _first_existing(
            (self.root, self.root / "chest_xray", self.root / "CellData" / "chest_xray",
             self.root / "chest_xray" / "chest_xray"),
            lambda folder: any((folder / split).is_dir() for split in self.SPLITS),
        )
        if found is None:
            raise FileNotFoundError(f"{self.root} holds no train/ val/ test/ folders of the Kermany layout")
        self.root = found

    @classmethod
    def patient_and_finding(cls, stem: str) -> tuple[str, str]:
        """``person12_virus_3`` -> ``("person12", "virus")``; ``NORMAL2-IM-0012-0001`` ->
        ``("IM-0012", "normal")``; other names -> ``("", "")``."""
        if match := cls.PERSON.match(stem):
            return f"person{int(match.group(1))}", match.group(2).lower()
        if match := cls.NORMAL.match(stem):
            return f"IM-{match.group(1)}", "normal"
        return "", ""

    def rows(self) -> Iterable[dict[str, Any]]:
        for split in self.SPLITS:
            if not (self.root / split).is_dir():
                continue
            for class_folder in sorted(p for p in (self.root / split).iterdir() if p.is_dir()):
                if name_key(class_folder.name) not in self.LABELS:
                    continue
                label = self.LABELS[name_key(class_folder.name)]
                for image in _image_files(class_folder):
                    patient, finding = self.patient_and_finding(image.stem)
                    image_id = f"{split}/{class_folder.name}/{image.stem}"
                    yield {
                        "image_id": image_id,
                        "path": image.relative_to(self.root).as_posix(),
                        "label": label,
                        "patient_id": _prefixed(self.name, patient or image_id),
                        "source": self.name,
                        "view": "AP",
                        "origin": mf.REAL,
                        "finding": finding or label,
                        "published_split": split,
                    }


class CheXpert(DatasetAdapter):
    """CheXpert (Stanford ML Group), full or downsampled ("CheXpert-v1.0-small").

    - **Size**: 224,316 chest radiographs (frontal and lateral) of 65,240 patients
      (Stanford Hospital, 2002-2017); ``valid.csv`` has 234 radiologist-labelled images
      of 200 patients. The small version is about 390x320 JPEG.
    - **Layout**: ``<root>/train.csv``, ``<root>/valid.csv`` with ``Path`` values like
      ``CheXpert-v1.0-small/train/patient00001/study1/view1_frontal.jpg`` (relative to
      the folder above ``<root>``; both forms are resolved), ``Sex, Age,
      Frontal/Lateral, AP/PA`` and the 14 observation columns.
    - **Labels**: each observation is ``1`` (positive), ``0`` (negative), ``-1``
      (uncertain) or blank (not mentioned), mined from reports. Kept raw in
      ``obs_<observation>`` columns; ``finding`` lists the positive observations
      (``Lung Opacity|Pneumonia``), ``uncertain`` the uncertain ones. ``label``:
      ``pneumonia`` when Pneumonia is positive, ``normal`` when No Finding is positive,
      ``other`` otherwise.
    - **Views**: frontal images take ``AP/PA`` (``AP`` / ``PA``), laterals ``L``; raw in
      ``view_raw``.
    - **Patients**: ``patientNNNNN`` from the path, prefixed (``chexpert:patient00001``).
      The published train / valid split is kept in ``published_split``.
    - **Citation**: J. Irvin et al., "CheXpert: A large chest radiograph dataset with
      uncertainty labels and expert comparison", AAAI 2019.
    - **License**: Stanford University School of Medicine CheXpert Dataset Research Use
      Agreement (registration required; no redistribution).
    - **Download**: https://stanfordmlgroup.github.io/competitions/chexpert/
    """

    name: ClassVar[str] = "chexpert"
    title: ClassVar[str] = "CheXpert (Stanford ML Group)"
    citation: ClassVar[str] = ('J. Irvin et al., "CheXpert: A large chest radiograph dataset '
                               'with uncertainty labels and expert comparison", AAAI 2019')
    license: ClassVar[str] = ("Stanford University School of Medicine CheXpert Dataset Research "
                              "Use Agreement (registration required; no redistribution)")
    url: ClassVar[str] = "https://stanfordmlgroup.github.io/competitions/chexpert/"
    TABLES: ClassVar[dict[str, str]] = {"train": "train.csv", "valid": "valid.csv"}
    OBSERVATIONS: ClassVar[tuple[str, ...]] = (
        "No Finding", "Enlarged Cardiomediastinum", "Cardiomegaly", "Lung Opacity", "Lung Lesion",
        "Edema", "Consolidation", "Pneumonia", "Atelectasis", "Pneumothorax", "Pleural Effusion",
        "Pleural Other", "Fracture", "Support Devices",
    )
    REQUIRED: ClassVar[tuple[str, ...]] = ("Path", "Frontal/Lateral", "AP/PA", *OBSERVATIONS)
    PATIENT: ClassVar[re.Pattern] = re.compile(r"(patient\d+)")

    @staticmethod
    def _value(raw: str) -> str:
        """``"1.0"`` -> ``"1"``, ``"-1.0"`` -> ``"-1"``, ``"0"`` -> ``"0"``, blank -> ``""``."""
        raw = raw.strip()
        try:
            return str(int(float(raw))) if raw else ""
        except ValueError:
            return raw

    def _relative(self, value: str) -> str | None:
        parts = Path(value.strip()).parts
        candidates = [Path(*parts[1:]).as_posix()] if len(parts) > 1 else []
        candidates.insert(0 if parts and parts[0] != self.root.name else 1, Path(value.strip()).as_posix())
        return _first_existing(candidates, lambda rel: (self.root / rel).is_file())

    def rows(self) -> Iterable[dict[str, Any]]:
        tables = {split: self.root / file for split, file in self.TABLES.items() if (self.root / file).is_file()}
        if not tables:
            raise DatasetFormatError(f"{self.name}: neither train.csv nor valid.csv in {self.root}")
        for split, csv_path in tables.items():
            table = read_table(csv_path, self.REQUIRED, dataset=self.name)
            for index, record in table.iterrows():
                line = _csv_line(int(index))
                value = record["Path"].strip()
                patient = self.PATIENT.search(value)
                if not value or not patient:
                    self._skip(csv_path, line, f"Path {value!r} names no patientNNNNN folder")
                    continue
                relative = self._relative(value)
                if relative is None:
                    self._skip(csv_path, line, f"image file {value} not found")
                    continue
                observations = {name: self._value(record[name]) for name in self.OBSERVATIONS}
                positive = [name for name, v in observations.items() if v == "1"]
                frontal = record["Frontal/Lateral"].strip()
                label = ("pneumonia" if observations["Pneumonia"] == "1"
                         else "normal" if observations["No Finding"] == "1" else "other")
                after_patient = value[patient.start():]
                yield {
                    "image_id": re.sub(r"\.[^./]+$", "", after_patient).replace("/", "_"),
                    "path": relative,
                    "label": label,
                    "patient_id": _prefixed(self.name, patient.group(1)),
                    "source": self.name,
                    "view": "L" if name_key(frontal) == "lateral" else normalize_view(record["AP/PA"]),
                    "origin": mf.REAL,
                    "finding": "|".join(positive) or "",
                    "uncertain": "|".join(n for n, v in observations.items() if v == "-1"),
                    "view_raw": f"{frontal} {record['AP/PA'].strip()}".strip(),
                    "published_split": split,
                    "sex": record.get("Sex", "").strip(),
                    "age": record.get("Age", "").strip(),
                    **{f"obs_{name_key(name)}": v for name, v in observations.items()},
                }


class _TuberculosisCollection(DatasetAdapter):
    """Shared reading of the NLM tuberculosis sets (Montgomery, Shenzhen)."""

    STEM: ClassVar[re.Pattern]
    FOLDERS: ClassVar[tuple[str, ...]] = ()

    def __init__(self, root: str | os.PathLike) -> None:
        super().__init__(root)
        found = _first_existing(
            (self.root, *(self.root / folder for folder in self.FOLDERS)),
            lambda folder: (folder / "CXR_png").is_dir(),
        )
        if found is None:
            raise FileNotFoundError(f"{self.root} has no CXR_png/ folder ({type(self).__name__} layout)")
        self.root = found

    def _reading(self, stem: str) -> str:
        """The clinical reading text file of an image, whitespace collapsed ("" if none)."""
        file = self.root / "ClinicalReadings" / f"{stem}.txt"
        if not file.is_file():
            return ""
        return " ".join(file.read_text(encoding="utf-8", errors="replace").split())

    def _masks(self, image: Path) -> dict[str, str]:
        return {}

    def rows(self) -> Iterable[dict[str, Any]]:
        for image in _image_files(self.root / "CXR_png"):
            match = self.STEM.match(image.stem)
            if not match:
                self._skip(image, image.name, "file name does not end in _0 (normal) or _1 (tuberculosis)")
                continue
            number, tb = match.groups()
            yield {
                "image_id": image.stem,
                "path": image.relative_to(self.root).as_posix(),
                "label": "tb" if tb == "1" else "normal",
                "patient_id": _prefixed(self.name, number),
                "source": self.name,
                "view": "PA",
                "origin": mf.REAL,
                "finding": "tuberculosis" if tb == "1" else "normal",
                "clinical_reading": self._reading(image.stem),
                **self._masks(image),
            }


class MontgomeryTB(_TuberculosisCollection):
    """Montgomery County tuberculosis chest X-ray set (NLM), with manual lung masks.

    - **Size**: 138 posterior-anterior chest X-rays (PNG, 4020x4892 or 4892x4020, 12-bit
      range stored in 8 / 16 bits) from the Montgomery County TB control program: 80
      normal, 58 with manifestations of tuberculosis.
    - **Layout**: ``<root>/CXR_png/MCUCXR_<nnnn>_<0|1>.png``,
      ``<root>/ManualMask/leftMask/<same name>`` and ``rightMask/<same name>`` (binary
      lung masks), ``<root>/ClinicalReadings/MCUCXR_<nnnn>_<0|1>.txt`` (sex, age and the
      radiologist's reading). The archive unpacks to ``MontgomerySet/`` (accepted).
    - **Labels**: ``tb`` for the ``_1`` suffix, ``normal`` for ``_0``; the reading text
      is kept in ``clinical_reading``.
    - **Masks**: ``mask_lung_left`` / ``mask_lung_right`` (patient's left / right, as the
      phantom's). The dataset's ``leftMask`` is the lung on the image's left, i.e. the
      patient's **right** lung in a PA film; the adapter checks that on the first image
      pair (centre of mass of each mask) and assigns the sides accordingly.
    - **Patients**: one image per patient; ``montgomery:<nnnn>``.
    - **Citation**: S. Jaeger, S. Candemir, S. Antani, Y.-X.J. Wang, P.-X. Lu, G. Thoma,
      "Two public chest X-ray datasets for computer-aided screening of pulmonary
      diseases", Quant. Imaging Med. Surg. 4(6), 475-477 (2014).
    - **License**: public, free to use with the citation (U.S. National Library of Medicine).
    - **Download**: https://lhncbc.nlm.nih.gov/LHC-downloads/downloads.html#tuberculosis-image-data-sets
    """

    name: ClassVar[str] = "montgomery"
    title: ClassVar[str] = "Montgomery County tuberculosis chest X-ray set (NLM)"
    citation: ClassVar[str] = ("S. Jaeger, S. Candemir, S. Antani, Y.-X.J. Wang, P.-X. Lu, G. "
                               'Thoma, "Two public chest X-ray datasets for computer-aided '
                               'screening of pulmonary diseases", Quant. Imaging Med. Surg. '
                               "4(6), 475-477 (2014)")
    license: ClassVar[str] = ("public, free to use with the citation (U.S. National Library of "
                              "Medicine)")
    url: ClassVar[str] = "https://lhncbc.nlm.nih.gov/LHC-downloads/downloads.html#tuberculosis-image-data-sets"
    STEM: ClassVar[re.Pattern] = re.compile(r"^MCUCXR_(\d+)_([01])$", re.IGNORECASE)
    FOLDERS: ClassVar[tuple[str, ...]] = ("MontgomerySet",)

    def _left_mask_is_patient_left(self, left: Path, right: Path) -> bool:
        """Whether ``leftMask`` holds the patient's left lung (the image's right side)."""
        from cxrlib.data.io import read_mask

        left_mask, right_mask = read_mask(left), read_mask(right)
        columns = [np.nonzero(mask)[1].mean() if mask.any() else np.nan for mask in (left_mask, right_mask)]
        return bool(columns[0] > columns[1])

    def rows(self) -> Iterable[dict[str, Any]]:
        self._sides: bool | None = None
        yield from super().rows()

    def _masks(self, image: Path) -> dict[str, str]:
        left = self.root / "ManualMask" / "leftMask" / image.name
        right = self.root / "ManualMask" / "rightMask" / image.name
        if not (left.is_file() and right.is_file()):
            return {"mask_lung_left": "", "mask_lung_right": ""}
        if self._sides is None:
            self._sides = self._left_mask_is_patient_left(left, right)
        patient_left, patient_right = (left, right) if self._sides else (right, left)
        return {"mask_lung_left": patient_left.relative_to(self.root).as_posix(),
                "mask_lung_right": patient_right.relative_to(self.root).as_posix()}


class ShenzhenTB(_TuberculosisCollection):
    """Shenzhen tuberculosis chest X-ray set (NLM / Shenzhen No.3 People's Hospital).

    - **Size**: 662 frontal chest X-rays (PNG, about 3000x3000): 326 normal, 336 with
      manifestations of tuberculosis, including paediatric cases.
    - **Layout**: ``<root>/CXR_png/CHNCXR_<nnnn>_<0|1>.png`` and
      ``<root>/ClinicalReadings/CHNCXR_<nnnn>_<0|1>.txt`` (sex, age, reading); the archive
      unpacks to ``ChinaSet_AllFiles/`` (accepted). Lung masks are not part of the
      release; the masks published separately (Stirenko et al. 2018, Kaggle
      "Chest Xray Masks and Labels") are read when a ``<root>/mask/`` folder holds
      ``CHNCXR_<nnnn>_<0|1>_mask.png`` files (union lung mask -> ``mask_path``).
    - **Labels**: ``tb`` for the ``_1`` suffix, ``normal`` for ``_0``; reading text in
      ``clinical_reading``.
    - **Patients**: one image per patient; ``shenzhen:<nnnn>``.
    - **Citation**: S. Jaeger et al., Quant. Imaging Med. Surg. 4(6), 475-477 (2014)
      (as Montgomery).
    - **License**: public, free to use with the citation.
    - **Download**: https://lhncbc.nlm.nih.gov/LHC-downloads/downloads.html#tuberculosis-image-data-sets
    """

    name: ClassVar[str] = "shenzhen"
    title: ClassVar[str] = ("Shenzhen tuberculosis chest X-ray set (NLM / Shenzhen No.3 "
                            "People's Hospital)")
    citation: ClassVar[str] = ("S. Jaeger, S. Candemir, S. Antani, Y.-X.J. Wang, P.-X. Lu, G. "
                               'Thoma, "Two public chest X-ray datasets for computer-aided '
                               'screening of pulmonary diseases", Quant. Imaging Med. Surg. '
                               "4(6), 475-477 (2014)")
    license: ClassVar[str] = ("public, free to use with the citation (U.S. National Library of "
                              "Medicine)")
    url: ClassVar[str] = "https://lhncbc.nlm.nih.gov/LHC-downloads/downloads.html#tuberculosis-image-data-sets"
    STEM: ClassVar[re.Pattern] = re.compile(r"^CHNCXR_(\d+)_([01])$", re.IGNORECASE)
    FOLDERS: ClassVar[tuple[str, ...]] = ("ChinaSet_AllFiles",)

    def _masks(self, image: Path) -> dict[str, str]:
        mask = self.root / "mask" / f"{image.stem}_mask.png"
        return {"mask_path": mask.relative_to(self.root).as_posix() if mask.is_file() else ""}


def convert_jsrt_image(source: str | os.PathLike, *, size: int = 1024) -> np.ndarray:
    """Read a raw JSRT ``.IMG`` file as an ``(size, size)`` ``uint8`` radiograph.

    The files have no header: 2048x2048 big-endian 16-bit samples holding 12-bit values
    (0..4095) where **high means dark** (film density), so they are inverted to the usual
    display (bone bright). ``size`` must divide 2048; the image is reduced by block means
    (1024 matches the SCR masks). Raises ``ValueError`` naming the file when its size is
    not 2048 * 2048 * 2 bytes.
    """
    side = 2048
    path = Path(source)
    raw = np.fromfile(path, dtype=">u2")
    if raw.size != side * side:
        raise ValueError(
            f"{path}: expected {side}x{side} 16-bit samples ({side * side * 2} bytes), "
            f"got {path.stat().st_size} bytes"
        )
    if side % size:
        raise ValueError(f"size must divide {side}, got {size}")
    values = np.minimum(raw.reshape(side, side).astype(np.float64), 4095.0)
    factor = side // size
    values = values.reshape(size, factor, size, factor).mean(axis=(1, 3))
    return np.clip(np.rint((4095.0 - values) * (255.0 / 4095.0)), 0, 255).astype(np.uint8)


class JSRT(DatasetAdapter):
    """JSRT chest X-ray database with the SCR (Segmentation in Chest Radiographs) masks.

    - **Size**: 247 posterior-anterior chest radiographs from 14 Japanese and one US
      institutions: 154 with a lung nodule (``JPCLN***``), 93 without (``JPCNN***``).
    - **Layout**: raw ``<root>/**/JPC[LN]N<nnn>.IMG`` files (e.g. ``All247images/``): no
      header, 2048x2048 big-endian 16-bit samples with 12-bit values (0.175 mm pixels).
      They are converted once to 8-bit 1024x1024 PNGs (:func:`convert_jsrt_image`) in
      ``cache_dir`` (default ``<data dir>/jsrt-png``), never next to the raw files;
      manifest ``path`` values point into the cache (absolute paths). SCR masks (van
      Ginneken et al.) are GIFs at 1024x1024 in ``masks/left lung/``, ``masks/right
      lung/`` and ``masks/heart/`` (``scr_root``; by default searched under ``<root>``);
      ``left lung`` is the patient's left -> ``mask_lung_left``, ``mask_lung_right``,
      ``mask_heart``.
    - **Labels**: ``nodule`` (JPCLN) / ``normal`` (JPCNN); ``finding`` the same.
    - **Patients**: one image per patient; ``jsrt:<stem>``.
    - **Citation**: J. Shiraishi et al., "Development of a digital image database for
      chest radiographs with and without a lung nodule", AJR 174, 71-74 (2000);
      B. van Ginneken, M.B. Stegmann, M. Loog, "Segmentation of anatomical structures in
      chest radiographs using supervised methods", Medical Image Analysis 10, 19-40 (2006).
    - **License**: JSRT terms of use (free for research and education, registration);
      SCR masks free for research.
    - **Download**: http://db.jsrt.or.jp/eng.php and https://www.isi.uu.nl/Research/Databases/SCR/
    """

    name: ClassVar[str] = "jsrt"
    title: ClassVar[str] = "JSRT chest X-ray database with the SCR lung and heart masks"
    citation: ClassVar[str] = ('J. Shiraishi et al., "Development of a digital image database '
                               'for chest radiographs with and without a lung nodule", AJR 174, '
                               "71-74 (2000); B. van Ginneken, M.B. Stegmann, M. Loog, "
                               '"Segmentation of anatomical structures in chest radiographs '
                               'using supervised methods", Medical Image Analysis 10, 19-40 '
                               "(2006)")
    license: ClassVar[str] = ("JSRT terms of use (free for research and education, registration "
                              "required); SCR masks free for research")
    url: ClassVar[str] = ("http://db.jsrt.or.jp/eng.php (images); "
                          "https://www.isi.uu.nl/Research/Databases/SCR/ (SCR masks)")
    STEM: ClassVar[re.Pattern] = re.compile(r"^JPC(LN|NN)\d+$", re.IGNORECASE)
    MASK_KINDS: ClassVar[dict[str, str]] = {"left lung": "mask_lung_left", "right lung": "mask_lung_right",
                                            "heart": "mask_heart"}

    def __init__(self, root: str | os.PathLike, *, cache_dir: str | os.PathLike | None = None,
                 scr_root: str | os.PathLike | None = None, size: int = 1024) -> None:
        super().__init__(root)
        from cxrlib import config

        self.cache_dir = Path(cache_dir).resolve() if cache_dir else config.data_dir() / f"jsrt-png-{size}"
        self.scr_root = Path(scr_root).resolve() if scr_root else self.root
        self.size = size

    def _mask_files(self) -> dict[str, dict[str, Path]]:
        """Mask kind folder name -> {image stem: gif file}, searched under :attr:`scr_root`."""
        found: dict[str, dict[str, Path]] = {kind: {} for kind in self.MASK_KINDS}
        if self.scr_root.is_dir():
            for folder in self.scr_root.rglob("*"):
                kind = folder.name.lower()
                if folder.is_dir() and kind in found:
                    for file in sorted(folder.glob("*.gif")):
                        found[kind].setdefault(file.stem.upper(), file)
        return found

    def rows(self) -> Iterable[dict[str, Any]]:
        from cxrlib.data.io import write_png

        masks = self._mask_files()
        for raw in sorted(p for p in self.root.rglob("*") if p.suffix.upper() == ".IMG" and p.is_file()):
            match = self.STEM.match(raw.stem)
            if not match:
                self._skip(raw, raw.name, "not a JSRT file name (JPCLNnnn / JPCNNnnn)", kind="excluded")
                continue
            stem = raw.stem.upper()
            png = self.cache_dir / f"{stem}.png"
            if not png.is_file():
                try:
                    write_png(png, convert_jsrt_image(raw, size=self.size))
                except ValueError as error:
                    self._skip(raw, raw.name, str(error))
                    continue
            nodule = match.group(1).upper() == "LN"
            yield {
                "image_id": stem,
                "path": png.as_posix(),
                "label": "nodule" if nodule else "normal",
                "patient_id": _prefixed(self.name, stem),
                "source": self.name,
                "view": "PA",
                "origin": mf.REAL,
                "finding": "nodule" if nodule else "normal",
                "raw_file": raw.relative_to(self.root).as_posix(),
                **{column: masks[kind][stem].as_posix() if stem in masks[kind] else ""
                   for kind, column in self.MASK_KINDS.items()},
            }


class ZunairSyntheticCovid(DatasetAdapter):
    """Synthetic COVID-19 chest X-rays of Zunair & Hamza (2021), made by two CycleGANs.

    - **Size**: 21,295 synthetic COVID-19 CXRs (256x256 PNG): every training Normal
      image translated by G_NC (Normal -> COVID-19) and every Pneumonia image by G_PC
      (Pneumonia -> COVID-19). Source images: RSNA Pneumonia Detection Challenge
      (itself drawn from NIH ChestX-ray14) and the ieee8023 COVID-19 collection.
    - **Layout** (assumed from the paper and the release notes; the release ships zip
      archives): ``<root>/G_NC/*.png`` and ``<root>/G_PC/*.png`` (one more wrapper folder
      level, as an archive may add, is accepted).
    - **Labels**: ``covid`` for all; ``translated_from`` = ``normal`` / ``pneumonia``.
    - **Origin**: ``G_NC:zunair2021`` / ``G_PC:zunair2021``
      (:func:`cxrlib.data.manifest.make_origin`): the source image of each synthetic image
      is **not published**, so it is unknown. A synthetic image may have been made from
      an image that sits in this project's test split; the near-duplicate check
      (:mod:`cxrlib.data.dedup`) compares them with the real images for that reason.
    - **Split**: ``train`` only (synthetic images are training data, never evaluation).
    - **Patients**: unknown; ``patient_id`` = ``zunair2021:<generator>/<stem>``.
    - **Citation**: H. Zunair, A.B. Hamza, "Synthesis of COVID-19 chest X-rays using
      unpaired image-to-image translation", Social Network Analysis and Mining 11, 23 (2021).
    - **License**: as stated in the repository (research use; cite the paper).
    - **Download**: https://github.com/hasibzunair/synthetic-covid-cxr-dataset/releases/tag/v0.1
    """

    name: ClassVar[str] = "zunair2021"
    title: ClassVar[str] = ("Synthetic COVID-19 chest X-rays of Zunair & Hamza (2021), release "
                            "v0.1")
    citation: ClassVar[str] = ('H. Zunair, A.B. Hamza, "Synthesis of COVID-19 chest X-rays '
                               'using unpaired image-to-image translation", Social Network '
                               "Analysis and Mining 11, 23 (2021)")
    license: ClassVar[str] = "as stated in the repository (research use; cite the paper)"
    url: ClassVar[str] = "https://github.com/hasibzunair/synthetic-covid-cxr-dataset/releases/tag/v0.1"
    CHECKPOINT: ClassVar[str] = "zunair2021"
    GENERATORS: ClassVar[dict[str, str]] = {"G_NC": "normal", "G_PC": "pneumonia"}

    def __init__(self, root: str | os.PathLike) -> None:
        super().__init__(root)
        found = _first_existing(
            (self.root, *sorted(p for p in self.root.iterdir() if p.is_dir())),
            lambda folder: any((folder / g).is_dir() for g in self.GENERATORS),
        )
        if found is None:
            raise FileNotFoundError(f"{self.root} has neither a G_NC/ nor a G_PC/ folder")
        self.root = found

    def rows(self) -> Iterable[dict[str, Any]]:
        for generator, source_label in self.GENERATORS.items():
            folder = self.root / generator
            if not folder.is_dir():
                continue
            for image in _image_files(folder):
                image_id = f"{generator}/{image.stem}"
                yield {
                    "image_id": image_id,
                    "path": image.relative_to(self.root).as_posix(),
                    "label": "covid",
                    "patient_id": _prefixed(self.name, image_id),
                    "source": self.name,
                    "split": "train",
                    "origin": mf.make_origin(generator, self.CHECKPOINT),
                    "finding": "COVID-19 (synthetic)",
                    "translated_from": source_label,
                }


class ImageFolderDataset(DatasetAdapter):
    """Any collection stored one folder per class: ``<root>/<class>/*.png|jpg|jpeg``.

    - **Labels**: the class folder name, normalised: known names map to the project's
      labels (``COVID-19`` / ``covid`` -> ``covid``, ``Viral Pneumonia`` / ``PNEUMONIA``
      -> ``pneumonia``, ``NORMAL`` / ``No Finding`` -> ``normal``, ``Lung_Opacity`` ->
      ``lung_opacity``); other names become lower case with ``_`` (``Tuberculosis`` ->
      ``tuberculosis``). The raw folder name is kept in ``finding``.
    - **Patients**: none in the layout, so each image is its own patient, unless a
      ``patients.csv`` (``image`` = path relative to ``<root>``, ``patient_id``) is given
      or lies in ``<root>``. Without it, follow-up images of one person may land in
      different splits.
    - ``source`` is the name given (default ``image-folder``); use one name per collection.
    - **Citation**, **License**, **Download**: those of the collection read; this layout is
      how many Kaggle re-packs (e.g. "COVID-19 Image Dataset", "Chest X-Ray Images
      (Pneumonia)" without its split folders) are published.
    """

    name: ClassVar[str] = "image-folder"
    title: ClassVar[str] = "any collection stored one folder per class (e.g. Kaggle re-packs)"
    citation: ClassVar[str] = "that of the collection read"
    license: ClassVar[str] = "that of the collection read"
    url: ClassVar[str] = "the collection's own page"
    ALIASES: ClassVar[dict[str, str]] = {
        "covid": "covid", "covid_19": "covid", "covid19": "covid",
        "normal": "normal", "no_finding": "normal", "healthy": "normal",
        "pneumonia": "pneumonia", "viral_pneumonia": "pneumonia", "bacterial_pneumonia": "pneumonia",
        "lung_opacity": "lung_opacity",
    }

    def __init__(self, root: str | os.PathLike, *, patients: str | os.PathLike | None = None,
                 source: str | None = None) -> None:
        super().__init__(root)
        if source:
            self.name = source  # type: ignore[misc]  # per-instance source name
        default = self.root / "patients.csv"
        self.patients_file = Path(patients) if patients else (default if default.is_file() else None)

    def declared_labels(self, df: pd.DataFrame) -> tuple[str, ...]:
        """The project's labels and one per class folder: the folders declare the classes."""
        return (*mf.LABELS, *sorted(set(df["label"])))

    def _patients(self) -> dict[str, str]:
        if self.patients_file is None:
            return {}
        table = read_table(self.patients_file, ("image", "patient_id"), dataset=self.name)
        return {Path(image.strip()).as_posix(): patient.strip()
                for image, patient in zip(table["image"], table["patient_id"], strict=True)
                if image.strip() and patient.strip()}

    def rows(self) -> Iterable[dict[str, Any]]:
        patients = self._patients()
        for class_folder in sorted(p for p in self.root.iterdir() if p.is_dir() and not p.name.startswith(".")):
            label = self.ALIASES.get(name_key(class_folder.name), name_key(class_folder.name))
            for image in _image_files(class_folder):
                relative = image.relative_to(self.root).as_posix()
                image_id = f"{class_folder.name}/{image.stem}"
                patient = patients.get(relative) or patients.get(image.name) or image_id
                yield {
                    "image_id": image_id,
                    "path": relative,
                    "label": label,
                    "patient_id": _prefixed(self.name, patient),
                    "source": self.name,
                    "origin": mf.REAL,
                    "finding": class_folder.name,
                }


#: Registry: name -> adapter class (see :func:`open_dataset`).
ADAPTERS: dict[str, type[DatasetAdapter]] = {
    Covid19RadiographyDatabase.name: Covid19RadiographyDatabase,
    CovidChestXrayDataset.name: CovidChestXrayDataset,
    NIHChestXray14.name: NIHChestXray14,
    KermanyPediatricPneumonia.name: KermanyPediatricPneumonia,
    CheXpert.name: CheXpert,
    MontgomeryTB.name: MontgomeryTB,
    ShenzhenTB.name: ShenzhenTB,
    JSRT.name: JSRT,
    ZunairSyntheticCovid.name: ZunairSyntheticCovid,
    ImageFolderDataset.name: ImageFolderDataset,
}


def open_dataset(name: str, root: str | os.PathLike, **options: Any) -> DatasetAdapter:
    """The adapter registered as ``name`` for the dataset folder ``root``; ``options`` go to
    its constructor (e.g. ``cache_dir`` for :class:`JSRT`)."""
    if name not in ADAPTERS:
        raise ValueError(f"unknown dataset {name!r}; known: {sorted(ADAPTERS)}")
    return ADAPTERS[name](root, **options)


class RSNAPneumonia(DatasetAdapter):
    """RSNA Pneumonia Detection Challenge (Kaggle, 2018), stage 2 training set, as DICOM.

    - **Size**: 26,684 frontal chest X-rays (DICOM, 1024x1024, 8-bit MONOCHROME2, JPEG
      baseline), a subset of NIH ChestX-ray14 re-read by radiologists of the RSNA and the
      Society of Thoracic Radiology: 6,012 ``Lung Opacity`` (with 9,555 boxes), 8,851
      ``Normal`` and 11,821 ``No Lung Opacity / Not Normal`` images.
    - **Layout**: ``<root>/stage_2_train_labels.csv`` (``patientId, x, y, width, height,
      Target``: one row per box; one row with empty box and ``Target`` 0 for an image
      without), ``<root>/stage_2_detailed_class_info.csv`` (``patientId, class``, repeated
      per box row) and ``<root>/stage_2_train_images/<patientId>.dcm``. ``patientId``
      names an image, not a person. The unlabelled ``stage_2_test_images/`` are not read.
    - **Labels**, from ``class`` (kept raw in ``finding``): ``pneumonia`` for ``Lung
      Opacity`` (opacities suggestive of pneumonia, boxed), ``normal`` for ``Normal``,
      ``other`` for ``No Lung Opacity / Not Normal`` (other findings, not pneumonia).
      Boxes: ``n_boxes`` and ``boxes`` (JSON list of ``[x, y, width, height]`` in pixels
      of the 1024x1024 image).
    - **Views, sex, age**: read from each DICOM header (:func:`cxrlib.data.dicom.dicom_record`):
      ``view`` (``PA`` / ``AP``; AP films come from sicker, often bed-bound patients),
      ``sex``, ``age`` (whole years, ages above 90 reported as 90).
    - **Patients**: the DICOM ``PatientID``, replaced by a salted hash
      (``rsna-pneumonia:<16 hex>``, salt from :func:`cxrlib.data.dicom.default_salt`
      unless given). In the released files ``PatientID`` equals the per-image
      ``patientId``, so every image is its own patient: follow-up films of one NIH
      patient may land in different splits, and the same images appear in other
      collections built from NIH or RSNA data (the COVID-19 Radiography Database takes
      its Normal and Lung_Opacity images from here): check near duplicates
      (:mod:`cxrlib.data.dedup`) when combining sources.
    - **Citation**: G. Shih et al., "Augmenting the National Institutes of Health chest
      radiograph dataset with expert annotations of possible pneumonia", Radiology:
      Artificial Intelligence 1(1), e180041 (2019).
    - **License**: the Kaggle competition rules, accepted on download; the images are
      NIH ChestX-ray14 images (NIH Clinical Center terms). Do not redistribute.
    - **Download**: credentialed, https://www.kaggle.com/c/rsna-pneumonia-detection-challenge/data
      (Kaggle account, accept the rules; ``kaggle competitions download -c
      rsna-pneumonia-detection-challenge``).

    Images whose DICOM file is missing or unreadable, ids without a class, unknown
    classes, bad box values and ids whose ``Target`` contradicts their class are skipped
    and listed in :attr:`skipped`. Reading the 26,684 headers takes a minute or two.
    """

    name: ClassVar[str] = "rsna-pneumonia"
    title: ClassVar[str] = ("RSNA Pneumonia Detection Challenge (Kaggle, 2018), stage 2 "
                            "training set")
    citation: ClassVar[str] = ('G. Shih et al., "Augmenting the National Institutes of Health '
                               "chest radiograph dataset with expert annotations of possible "
                               'pneumonia", Radiology: Artificial Intelligence 1(1), e180041 '
                               "(2019)")
    license: ClassVar[str] = ("Kaggle competition rules, accepted on download (non-commercial "
                              "research); the images are NIH ChestX-ray14 images (NIH Clinical "
                              "Center terms); do not redistribute")
    url: ClassVar[str] = "https://www.kaggle.com/c/rsna-pneumonia-detection-challenge/data"
    LABELS_CSV: ClassVar[str] = "stage_2_train_labels.csv"
    CLASS_CSV: ClassVar[str] = "stage_2_detailed_class_info.csv"
    IMAGES: ClassVar[str] = "stage_2_train_images"
    #: Kaggle's archive name, accepted as a wrapper folder.
    ARCHIVE_FOLDER: ClassVar[str] = "rsna-pneumonia-detection-challenge"
    #: Class (normalised by :func:`name_key`) -> canonical label.
    LABELS: ClassVar[dict[str, str]] = {
        "lung_opacity": "pneumonia",
        "normal": "normal",
        "no_lung_opacity_/_not_normal": "other",
    }
    BOX_COLUMNS: ClassVar[tuple[str, ...]] = ("x", "y", "width", "height")

    def __init__(self, root: str | os.PathLike, *, salt: str | bytes | None = None) -> None:
        from cxrlib.data.dicom import default_salt, hash_patient_id

        super().__init__(root)
        found = _first_existing((self.root, self.root / self.ARCHIVE_FOLDER),
                                lambda folder: (folder / self.LABELS_CSV).is_file())
        if found is None:
            raise FileNotFoundError(
                f"{self.root} has no {self.LABELS_CSV} (RSNA Pneumonia layout: {self.LABELS_CSV}, "
                f"{self.CLASS_CSV}, {self.IMAGES}/<patientId>.dcm)"
            )
        self.root = found
        self._salt = default_salt() if salt is None else salt
        hash_patient_id("salt-check", salt=self._salt)  # an empty salt fails here, not mid-run

    def _classes(self) -> dict[str, str]:
        path = self.root / self.CLASS_CSV
        table = read_table(path, ("patientId", "class"), dataset=self.name)
        classes: dict[str, str] = {}
        for index, record in table.iterrows():
            image, raw = record["patientId"].strip(), record["class"].strip()
            if not image or not raw:
                self._skip(path, _csv_line(int(index)), "empty patientId" if not image else "empty class")
                continue
            if classes.setdefault(image, raw) != raw:
                classes[image] = ""  # contradictory rows: reported when the image comes up
        return classes

    def _boxes(self) -> tuple[dict[str, list[list[float]]], dict[str, set[str]], set[str]]:
        """Boxes and Target values per patientId (in file order), and ids with a bad row."""
        path = self.root / self.LABELS_CSV
        table = read_table(path, ("patientId", *self.BOX_COLUMNS, "Target"), dataset=self.name)
        boxes: dict[str, list[list[float]]] = {}
        targets: dict[str, set[str]] = {}
        broken: set[str] = set()
        for index, record in table.iterrows():
            image, target = record["patientId"].strip(), record["Target"].strip()
            line = _csv_line(int(index))
            if not image:
                self._skip(path, line, "empty patientId")
                continue
            boxes.setdefault(image, [])
            targets.setdefault(image, set()).add(target)
            if target == "1":
                try:
                    box = [float(record[column]) for column in self.BOX_COLUMNS]
                except ValueError:
                    box = []
                if len(box) != 4 or not all(np.isfinite(box)) or box[2] <= 0 or box[3] <= 0:
                    self._skip(path, line, f"{image}: Target 1 with an invalid box {[record[c] for c in self.BOX_COLUMNS]}")
                    broken.add(image)
                    continue
                boxes[image].append(box)
            elif target != "0":
                self._skip(path, line, f"{image}: Target {target!r} is neither 0 nor 1")
                broken.add(image)
        return boxes, targets, broken

    def rows(self) -> Iterable[dict[str, Any]]:
        import json

        from cxrlib.data.dicom import DicomReadError, dicom_record, hash_patient_id

        classes = self._classes()
        boxes, targets, broken = self._boxes()
        labels_csv = self.root / self.LABELS_CSV
        for image_id, image_boxes in boxes.items():
            if image_id in broken:
                continue
            raw = classes.get(image_id)
            if raw is None:
                self._skip(labels_csv, image_id, f"no class in {self.CLASS_CSV}")
                continue
            if raw == "":
                self._skip(self.root / self.CLASS_CSV, image_id, "contradictory classes")
                continue
            label = self.LABELS.get(name_key(raw))
            if label is None:
                self._skip(self.root / self.CLASS_CSV, image_id, f"unknown class {raw!r}; known: {sorted(self.LABELS)}")
                continue
            expected = {"1"} if label == "pneumonia" else {"0"}
            if targets[image_id] != expected:
                self._skip(labels_csv, image_id, f"Target {sorted(targets[image_id])} contradicts class {raw!r}")
                continue
            dicom_path = self.root / self.IMAGES / f"{image_id}.dcm"
            if not dicom_path.is_file():
                self._skip(dicom_path, image_id, "DICOM file not found")
                continue
            try:
                header = dicom_record(dicom_path, salt=self._salt)
            except DicomReadError as error:
                self._skip(dicom_path, image_id, error.reason)
                continue
            # a file without PatientID falls back to its image id: its own patient, as all are here
            patient = header["patient_id"] or hash_patient_id(image_id, salt=self._salt)
            yield {
                "image_id": image_id,
                "path": dicom_path.relative_to(self.root).as_posix(),
                "label": label,
                "patient_id": _prefixed(self.name, patient),
                "source": self.name,
                "view": normalize_view(header["view"] or ""),
                "origin": mf.REAL,
                "finding": raw,
                "view_raw": header["view"] or "",
                "sex": header["sex"] or "",
                "age": "" if header["age_years"] is None else str(header["age_years"]),
                "n_boxes": str(len(image_boxes)),
                "boxes": json.dumps(image_boxes),
            }


ADAPTERS[RSNAPneumonia.name] = RSNAPneumonia


def paste_structure_mask(crop: np.ndarray, left: int, top: int, canvas_shape: tuple[int, int]) -> np.ndarray:
    """Paste one ``covid-segmentations`` mask crop into an image-sized canvas.

    ``crop``: ``(h, w)``, ``(h, w, 3)`` or ``(h, w, 4)`` array as decoded from the mask PNG
    (RGBA in the published files: the structure is drawn in one colour on black, alpha
    255); a pixel is foreground where any colour channel is > 0 and, when there is an alpha
    channel, alpha is > 0. ``left`` / ``top``: the crop's position on the image, in pixels;
    ``canvas_shape``: ``(H, W)`` of the image. Parts of the crop outside the canvas are cut
    off. Returns ``(H, W)`` bool.
    """
    crop = np.asarray(crop)
    if crop.ndim == 3:
        colour = crop[..., :3] if crop.shape[-1] >= 3 else crop[..., :1]
        foreground = colour.max(axis=-1) > 0
        if crop.shape[-1] in (2, 4):
            foreground &= crop[..., -1] > 0
    elif crop.ndim == 2:
        foreground = crop > 0
    else:
        raise ValueError(f"mask crop must be (h, w) or (h, w, channels), got shape {crop.shape}")
    height, width = (int(s) for s in canvas_shape)
    canvas = np.zeros((height, width), dtype=bool)
    y0, x0 = max(0, int(top)), max(0, int(left))
    y1, x1 = min(height, int(top) + crop.shape[0]), min(width, int(left) + crop.shape[1])
    if y1 > y0 and x1 > x0:
        canvas[y0:y1, x0:x1] = foreground[y0 - int(top):y1 - int(top), x0 - int(left):x1 - int(left)]
    return canvas


class CovidSegmentations(DatasetAdapter):
    """COVID-19 chest X-ray segmentations (GeneralBlockchain), expert masks per structure.

    - **Size** (the public release): 517 frontal X-rays of the ieee8023 COVID-19 image data
      collection, each with expert masks of the left and right lung, the cardiomediastinum,
      the airways, ground-glass opacities, consolidation, pneumothorax and devices
      (endotracheal / nasogastric tube, central venous line, tubings, monitoring probes).
    - **Layout**: ``<root>/metadata.csv`` (the ieee8023 schema: ``patientid, finding,
      view, modality, filename, ...``), ``<root>/images/<filename>`` (full-size films),
      ``<root>/masks/<sha1>_<id>.png`` and ``<root>/structure.csv``, one row per drawn
      structure: ``Class`` (e.g. ``COVID-19 Left Lung``), ``Filename`` (the image),
      ``Mask`` (``masks/...png``), ``Resolution`` (``<W>x<H>`` of the annotated film) and
      ``Left, Top, Width, Height``: each mask is an RGBA crop of ``Width`` x ``Height``
      pixels to paste into an image-sized canvas at (``Left``, ``Top``)
      (:func:`paste_structure_mask`). A structure with no row was not drawn (no lesion of
      that kind); a row with an empty ``Mask`` is skipped and listed.
    - **Masks written**: the crops are pasted once into 0/255 PNGs of the image's size in
      ``cache_dir`` (default ``<data dir>/covid-segmentations-masks``), never next to the
      dataset; when the film in ``images/`` was resized after annotation, the canvas is
      resized to it (nearest neighbour). One column per structure
      (:attr:`STRUCTURES`): ``mask_lung_left``, ``mask_lung_right`` (the patient's left /
      right lung, so :func:`cxrlib.data.datasets.load_label_map` reads them),
      ``mask_cardiomediastinum``, ``mask_ground_glass``, ``mask_consolidation``, ...;
      ``""`` where the experts drew no such structure. :meth:`structure_masks` gives the
      same masks in memory.
    - **Lung convention**: ``anatomical``: each lung includes the part behind the heart
      and under dense opacities (:mod:`cxrlib.data.masks` converts to ``visible`` by
      removing the cardiomediastinum).
    - **Labels**, from ``finding`` as :meth:`CovidChestXrayDataset.label_of` reads it.
    - **Patients and films**: every film is also in the ieee8023 collection (same file
      name, same patient). ``patient_id`` is the ieee8023 one (``ieee8023:<patientid>``),
      so a patient-level split keeps both copies of a film on one side;
      ``ieee8023_image_id`` is the ``image_id`` of the same film in the
      :class:`CovidChestXrayDataset` manifest. ``image_id`` is ``covseg-<filename>`` so
      the two manifests can be concatenated.
    - **Citation**: GeneralBlockchain, "COVID-19 chest X-ray segmentations dataset"
      (2020), on the images of J.P. Cohen et al., "COVID-19 image data collection:
      Prospective predictions are the future", MELBA 1 (2020).
    - **License**: masks as stated by the repository; images as the ieee8023 images they
      annotate (per image, column ``license``).
    - **Download**: https://github.com/GeneralBlockchain/covid-19-chest-xray-segmentations-dataset
    """

    name: ClassVar[str] = "covid-segmentations"
    title: ClassVar[str] = ("COVID-19 chest X-ray segmentations dataset (GeneralBlockchain), expert "
                            "masks of lungs, cardiomediastinum, lesions and devices")
    citation: ClassVar[str] = ('GeneralBlockchain, "COVID-19 chest X-ray segmentations dataset" '
                               "(2020), annotating the images of J.P. Cohen et al., \"COVID-19 image "
                               'data collection: Prospective predictions are the future", Machine '
                               "Learning for Biomedical Imaging 1 (2020)")
    license: ClassVar[str] = ("masks as stated by the repository; images keep the per-image license "
                              "of the ieee8023 collection (column license: CC BY, CC BY-NC-SA, ... "
                              "or blank); check each image's license before reuse")
    url: ClassVar[str] = "https://github.com/GeneralBlockchain/covid-19-chest-xray-segmentations-dataset"
    METADATA: ClassVar[str] = "metadata.csv"
    STRUCTURE: ClassVar[str] = "structure.csv"
    REQUIRED: ClassVar[tuple[str, ...]] = ("patientid", "finding", "view", "modality", "filename")
    STRUCTURE_REQUIRED: ClassVar[tuple[str, ...]] = ("Class", "Filename", "Mask", "Resolution",
                                                     "Left", "Top", "Width", "Height")
    KEEP: ClassVar[tuple[str, ...]] = ("offset", "sex", "age", "date", "location", "license", "doi", "url")
    #: ``Class`` of structure.csv (without the ``COVID-19`` prefix, lower case) -> manifest column.
    STRUCTURES: ClassVar[dict[str, str]] = {
        "left lung": "mask_lung_left",
        "right lung": "mask_lung_right",
        "cardiomediastinum": "mask_cardiomediastinum",
        "airways": "mask_airways",
        "ground glass opacities": "mask_ground_glass",
        "consolidation": "mask_consolidation",
        "pneumothorax": "mask_pneumothorax",
        "endotracheal tube": "mask_endotracheal_tube",
        "nosogastric tube": "mask_nasogastric_tube",
        "nasogastric tube": "mask_nasogastric_tube",
        "central venous line": "mask_central_venous_line",
        "tubings": "mask_tubings",
        "monitoring probes": "mask_monitoring_probes",
    }
    #: Columns of the lesion masks (lesion burden: :mod:`cxrlib.stages.lung_segmentation`).
    LESION_COLUMNS: ClassVar[tuple[str, ...]] = ("mask_ground_glass", "mask_consolidation")

    def __init__(self, root: str | os.PathLike, *, cache_dir: str | os.PathLike | None = None) -> None:
        super().__init__(root)
        from cxrlib import config

        self.cache_dir = (Path(cache_dir).resolve() if cache_dir
                          else config.data_dir() / "covid-segmentations-masks")

    @classmethod
    def structure_column(cls, raw_class: str) -> str | None:
        """``"COVID-19 Left Lung"`` -> ``"mask_lung_left"``; ``None`` for an unknown class."""
        key = re.sub(r"\s+", " ", re.sub(r"^covid[\s\-]*19\s*", "", str(raw_class).strip().lower()))
        return cls.STRUCTURES.get(key)

    def _structure_table(self) -> pd.DataFrame:
        return read_table(self.root / self.STRUCTURE, self.STRUCTURE_REQUIRED, dataset=self.name)

    def _paste(self, record: Mapping[str, Any], image_shape: tuple[int, int]) -> np.ndarray:
        """One structure row of structure.csv as an ``(H, W)`` bool mask on the image's grid."""
        from PIL import Image

        from cxrlib.data.transforms import resize_mask

        match = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*", str(record["Resolution"]))
        if not match:
            raise ValueError(f"Resolution {record['Resolution']!r} is not <width>x<height>")
        width, height = int(match.group(1)), int(match.group(2))
        with Image.open(self.root / str(record["Mask"]).strip()) as crop:
            pixels = np.asarray(crop.convert("RGBA") if crop.mode in ("P", "LA", "PA") else crop)
        if pixels.shape[:2] != (int(float(record["Height"])), int(float(record["Width"]))):
            raise ValueError(f"mask is {pixels.shape[1]}x{pixels.shape[0]} px, the table says "
                             f"{record['Width']}x{record['Height']}")
        canvas = paste_structure_mask(pixels, int(float(record["Left"])), int(float(record["Top"])),
                                      (height, width))
        return canvas if canvas.shape == tuple(image_shape) else resize_mask(canvas, image_shape)

    def structure_masks(self, filename: str) -> dict[str, np.ndarray]:
        """The expert masks of one film (``filename`` as in metadata.csv), in memory.

        Returns manifest column (:attr:`STRUCTURES`) -> ``(H, W)`` bool on the grid of
        ``images/<filename>``; structures the experts drew several times are united, the ones
        they did not draw are absent. Raises ``ValueError`` naming the row of a broken mask.
        """
        from PIL import Image

        with Image.open(self.root / "images" / filename) as image:
            shape = (image.height, image.width)
        table = self._structure_table()
        masks: dict[str, np.ndarray] = {}
        for index, record in table[table["Filename"].str.strip() == filename].iterrows():
            column = self.structure_column(record["Class"])
            if column is None or not str(record["Mask"]).strip():
                continue
            try:
                mask = self._paste(record, shape)
            except (OSError, ValueError) as error:
                raise ValueError(f"{self.root / self.STRUCTURE} {_csv_line(int(index))}: {error}") from None
            masks[column] = masks[column] | mask if column in masks else mask
        return masks

    def rows(self) -> Iterable[dict[str, Any]]:
        from PIL import Image

        from cxrlib.data.io import write_png

        csv_path, structure_path = self.root / self.METADATA, self.root / self.STRUCTURE
        table = read_table(csv_path, self.REQUIRED, dataset=self.name)
        structures = self._structure_table()
        by_film: dict[str, list[tuple[int, pd.Series]]] = {}
        for index, record in structures.iterrows():
            line = _csv_line(int(index))
            column = self.structure_column(record["Class"])
            if column is None:
                self._skip(structure_path, line, f"unknown structure {record['Class']!r}", kind="excluded")
            elif not str(record["Mask"]).strip():
                self._skip(structure_path, line, f"{record['Class']}: tagged without a mask (empty Mask)",
                           kind="excluded")
            else:
                by_film.setdefault(record["Filename"].strip(), []).append((int(index), record))
        for index, record in table.iterrows():
            line = _csv_line(int(index))
            filename, patient = record["filename"].strip(), record["patientid"].strip()
            if not filename or not patient:
                self._skip(csv_path, line, "empty filename" if not filename else "empty patientid")
                continue
            image_path = self.root / "images" / filename
            if not image_path.is_file():
                self._skip(csv_path, line, f"image file images/{filename} not found")
                continue
            with Image.open(image_path) as image:
                shape = (image.height, image.width)
            masks: dict[str, np.ndarray] = {}
            problem = ""
            for row_index, structure in by_film.get(filename, []):
                column = self.structure_column(structure["Class"])
                try:
                    mask = self._paste(structure, shape)
                except (OSError, ValueError) as error:
                    problem = f"{self.STRUCTURE} {_csv_line(row_index)}: {error}"
                    break
                masks[column] = masks[column] | mask if column in masks else mask
            if problem:
                self._skip(csv_path, line, problem)
                continue
            if "mask_lung_left" not in masks or "mask_lung_right" not in masks:
                self._skip(csv_path, line, f"{filename}: no left and right lung masks in {self.STRUCTURE}")
                continue
            stem = Path(filename).stem
            files: dict[str, str] = {}
            for column in dict.fromkeys(self.STRUCTURES.values()):
                if column in masks:
                    target = self.cache_dir / column.removeprefix("mask_") / f"{stem}.png"
                    write_png(target, masks[column])
                    files[column] = target.as_posix()
                else:
                    files[column] = ""
            finding = record["finding"].strip()
            yield {
                "image_id": f"covseg-{filename}",
                "path": f"images/{filename}",
                "label": CovidChestXrayDataset.label_of(finding),
                "patient_id": _prefixed(CovidChestXrayDataset.name, patient),
                "source": self.name,
                "view": normalize_view(record["view"]),
                "origin": mf.REAL,
                "finding": finding,
                "view_raw": record["view"].strip(),
                "ieee8023_image_id": filename,
                "lung_convention": "anatomical",
                **files,
                **{column: record[column].strip() for column in self.KEEP if column in table.columns},
            }


ADAPTERS[CovidSegmentations.name] = CovidSegmentations


class CovidCXNet(DatasetAdapter):
    """COVID-CXNet image repository (Haghanifar et al.): COVID-19 chest X-rays from public sources.

    - **Size**: about 900 COVID-19 chest X-rays collected from public case sites and
      publications (SIRM, Radiopaedia, Eurorad, papers, social media), in every format
      (``.jpg .jpeg .JPG .png .PNG .jfif .webp``), sizes and grey levels; no other class.
    - **Layout**: ``<root>/chest_xray_images/covid19/<number><marks>.<ext>`` and
      ``<root>/metadata.csv`` (``filename, patient_id, sex, age, view, label, pcr_test,
      location, ..., url``) with rows for about half of the images. A metadata row finds
      its file by exact name, else by name ignoring case, else by its leading number
      (``374.png`` -> ``374.PNG``, ``403.jpg`` -> ``403.jpeg``); a row whose file is
      missing is skipped and listed. Other folders under ``chest_xray_images/`` are read as
      classes by their name (``normal`` -> ``normal``, ``pneumonia`` -> ``pneumonia``).
    - **File-name marks**, kept as columns: a trailing ``-`` (``166-.jpeg``) marks a
      PCR-positive patient whose film showed no abnormality (``normal_film`` ``"1"``), a
      trailing ``p`` a pediatric patient (``pediatric`` ``"1"``); ``name_marks`` holds the
      raw marks. They stay labelled ``covid``; a recipe can leave them out
      (``normal_film: "0"``).
    - **Patients**: ``patient_id`` of the metadata (several films per patient), prefixed
      ``covid-cxnet:``; an image without a metadata row is its own patient
      (``covid-cxnet:image-<number>``), so follow-up films without metadata may land in
      different splits.
    - **Views**: the metadata ``view`` (mostly AP, some PA, often blank), normalised by
      :func:`normalize_view`, the raw value in ``view_raw``; ``""`` for images without a row.
    - **Copies**: collected from the same public case sites as the ieee8023 collection, so
      some films appear in both, resized, re-encoded, re-cropped or re-windowed: use the two
      together only after copy detection (:mod:`cxrlib.data.copies`).
    - **Citation**: A. Haghanifar, M.M. Majdabadi, Y. Choi, S. Deivalakshmi, S. Ko,
      "COVID-CXNet: Detecting COVID-19 in frontal chest X-ray images using deep learning",
      Multimedia Tools and Applications 81, 30615-30645 (2022).
    - **License**: CC BY 4.0 as stated by the release (figshare, DOI
      10.6084/m9.figshare.12580328); the images come from public case sites whose own
      terms also apply.
    - **Download**: https://github.com/armiro/COVID-CXNet (folder ``chest_xray_images``).

    ``image_id`` is the file name.
    """

    name: ClassVar[str] = "covid-cxnet"
    title: ClassVar[str] = "COVID-CXNet chest X-ray image repository (COVID-19 images from public sources)"
    citation: ClassVar[str] = ('A. Haghanifar, M.M. Majdabadi, Y. Choi, S. Deivalakshmi, S. Ko, '
                               '"COVID-CXNet: Detecting COVID-19 in frontal chest X-ray images using '
                               'deep learning", Multimedia Tools and Applications 81, 30615-30645 (2022)')
    license: ClassVar[str] = ("CC BY 4.0 as stated by the release (DOI 10.6084/m9.figshare.12580328); "
                              "the images were collected from public case sites (SIRM, Radiopaedia, "
                              "Eurorad, papers, social media) whose own terms also apply")
    url: ClassVar[str] = "https://github.com/armiro/COVID-CXNet"
    IMAGES: ClassVar[str] = "chest_xray_images"
    METADATA: ClassVar[str] = "metadata.csv"
    SUFFIXES: ClassVar[tuple[str, ...]] = (".png", ".jpg", ".jpeg", ".jfif", ".webp")
    #: Metadata columns carried into the manifest when present.
    KEEP: ClassVar[tuple[str, ...]] = ("sex", "age", "pcr_test", "location", "admission_offset",
                                       "symptom_offset", "url")
    ALIASES: ClassVar[dict[str, str]] = {"covid19": "covid", "covid_19": "covid", "covid": "covid",
                                         "normal": "normal", "pneumonia": "pneumonia"}
    NAME: ClassVar[re.Pattern] = re.compile(r"^(?P<number>\d*)(?P<marks>[p\-]*)$", re.IGNORECASE)

    def _files(self) -> list[Path]:
        folder = self.root / self.IMAGES
        if not folder.is_dir():
            raise DatasetFormatError(f"{self.name}: {folder} not found (COVID-CXNet layout: "
                                     f"{self.IMAGES}/covid19/*, {self.METADATA})")
        return sorted(p for class_folder in sorted(folder.iterdir())
                      if class_folder.is_dir() and not class_folder.name.startswith(".")
                      for p in class_folder.iterdir()
                      if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in self.SUFFIXES)

    @classmethod
    def marks(cls, file_name: str) -> dict[str, str]:
        """``"481p-.jpg"`` -> ``{"name_marks": "p-", "normal_film": "1", "pediatric": "1"}``."""
        match = cls.NAME.match(Path(file_name).stem)
        marks = match.group("marks").lower() if match else ""
        return {"name_marks": marks, "normal_film": "1" if "-" in marks else "0",
                "pediatric": "1" if "p" in marks else "0"}

    def _metadata(self, files: list[Path]) -> dict[Path, tuple[str, dict[str, str]]]:
        """Image file -> (csv line, metadata row), matched as the class docstring says."""
        csv_path = self.root / self.METADATA
        if not csv_path.is_file():
            return {}
        table = read_table(csv_path, ("filename", "patient_id"), dataset=self.name)
        exact = {p.name: p for p in files}
        folded: dict[str, list[Path]] = {}
        numbered: dict[str, list[Path]] = {}
        for p in files:
            folded.setdefault(p.name.lower(), []).append(p)
            match = self.NAME.match(p.stem)
            if match and match.group("number"):
                numbered.setdefault(str(int(match.group("number"))), []).append(p)
        found: dict[Path, tuple[str, dict[str, str]]] = {}
        for index, record in table.iterrows():
            line = _csv_line(int(index))
            name = record["filename"].strip()
            if not name:
                self._skip(csv_path, line, "empty filename")
                continue
            match = self.NAME.match(Path(name).stem)
            candidates = ([exact[name]] if name in exact else folded.get(name.lower())
                          or (numbered.get(str(int(match.group("number")))) if match and match.group("number")
                              else None) or [])
            if len(candidates) != 1:
                reason = f"image file {name} not found" if not candidates else f"{name} matches several files"
                self._skip(csv_path, line, reason)
                continue
            file = candidates[0]
            if file in found:
                self._skip(csv_path, line, f"{file.name} already described on {found[file][0]}")
                continue
            found[file] = (line, {k: str(v).strip() for k, v in record.items()})
        return found

    def rows(self) -> Iterable[dict[str, Any]]:
        files = self._files()
        metadata = self._metadata(files)
        seen: set[str] = set()
        for file in files:
            if file.name in seen:
                self._skip(file, file.name, "file name already used in another folder")
                continue
            seen.add(file.name)
            folder = file.parent.name
            label = self.ALIASES.get(name_key(folder), name_key(folder))
            line, record = metadata.get(file, ("", {}))
            patient = record.get("patient_id", "")
            if not patient:
                match = self.NAME.match(file.stem)
                number = match.group("number") if match and match.group("number") else file.stem
                patient = f"image-{number}"
            yield {
                "image_id": file.name,
                "path": file.relative_to(self.root).as_posix(),
                "label": label,
                "patient_id": _prefixed(self.name, patient),
                "source": self.name,
                "view": normalize_view(record.get("view", "")),
                "origin": mf.REAL,
                "finding": record.get("label", "") or folder,
                "view_raw": record.get("view", ""),
                "in_metadata": "1" if line else "0",
                **self.marks(file.name),
                **{column: record.get(column, "") for column in self.KEEP},
            }


class CsvImageFolder(DatasetAdapter):
    """A user's own collection: one CSV table of images + a folder of image files.

    Every column name comes from the recipe (the constructor's options), so a collection in
    this shape needs no code::

        sources:
          mine:
            adapter: csv-images
            root: my-hospital             # folder under DATA_ROOT
            csv: labels.csv               # table, relative to root
            images: png                   # image folder, relative to root (default: root)
            image_column: file            # file name / relative path, or an id + extension
            extension: ""                 # appended to image_column values (e.g. ".png")
            patient_column: patient       # optional: without it each image is its own patient
            view_column: projection       # optional
            label_column: diagnosis       # or `label: covid` for a collection of one class
            labels: {"COVID-19 positive": covid, "healthy": normal}   # optional raw -> label

    - **Labels**: with ``label_column``, its value mapped by ``labels`` (keys compared as
      :func:`name_key` gives), else by the usual names (``COVID-19`` -> ``covid``, ``No
      Finding`` / ``healthy`` -> ``normal``, ``Viral Pneumonia`` -> ``pneumonia``), else
      lower case with ``_``; the raw value is kept in ``finding``. With ``label``, every row
      gets it (``finding`` is the label too).
    - **Other columns** of the table are kept (those not named like a manifest column), so
      recipes can filter on them.
    - ``source`` is the name given (default ``csv-images``); use one name per collection.
    - **Citation**, **License**, **Download**: those of the collection read.

    Rows with an empty image, patient or label value, a file that does not exist or one
    already listed are skipped and listed in :attr:`skipped`. Paths in the options must
    stay inside ``root`` (no absolute paths, no ``..``).
    """

    name: ClassVar[str] = "csv-images"
    title: ClassVar[str] = "any collection given as one CSV table + a folder of images (columns named in the recipe)"
    citation: ClassVar[str] = "that of the collection read"
    license: ClassVar[str] = "that of the collection read"
    url: ClassVar[str] = "the collection's own page"
    ALIASES: ClassVar[dict[str, str]] = {
        **ImageFolderDataset.ALIASES, "covid_19_positive": "covid", "sars_cov_2": "covid",
    }

    def __init__(self, root: str | os.PathLike, *, csv: str = "labels.csv", images: str = ".",
                 image_column: str = "image", extension: str = "", patient_column: str | None = None,
                 view_column: str | None = None, label_column: str | None = None, label: str | None = None,
                 labels: Mapping[str, str] | None = None, source: str | None = None) -> None:
        super().__init__(root)
        if source:
            self.name = source  # type: ignore[misc]  # per-instance source name
        if (label_column is None) == (label is None):
            raise DatasetFormatError(f"{self.name}: give exactly one of label_column (a column of {csv}) "
                                     f"or label (one label for every image)")
        for option, value in (("csv", csv), ("images", images)):
            parts = Path(str(value).replace("\\", "/")).parts
            if Path(str(value)).is_absolute() or ".." in parts:
                raise DatasetFormatError(f"{self.name}: {option} {value!r} must be a path inside {self.root}")
        self.csv_path = self.root / csv
        self.images = (self.root / images).resolve()
        if not self.images.is_dir():
            raise DatasetFormatError(f"{self.name}: image folder {self.images} not found")
        self.image_column, self.extension = image_column, extension
        self.patient_column, self.view_column = patient_column, view_column
        self.label_column, self.fixed_label = label_column, label
        self.labels = {name_key(k): str(v) for k, v in (labels or {}).items()}

    def declared_labels(self, df: pd.DataFrame) -> tuple[str, ...]:
        """The project's labels and every label the table gives: the recipe declares the classes."""
        return (*mf.LABELS, *sorted(set(df["label"])))

    def _label(self, raw: str) -> str:
        key = name_key(raw)
        return self.labels.get(key) or self.ALIASES.get(key) or key

    def rows(self) -> Iterable[dict[str, Any]]:
        required = [c for c in (self.image_column, self.patient_column, self.view_column, self.label_column) if c]
        table = read_table(self.csv_path, required, dataset=self.name)
        named = set(required) | set(mf.COLUMNS) | {"finding", "view_raw"}
        extras = [c for c in table.columns if c not in named and c]
        seen: dict[str, str] = {}
        for index, record in table.iterrows():
            line = _csv_line(int(index))
            image = record[self.image_column].strip()
            if not image:
                self._skip(self.csv_path, line, f"empty {self.image_column!r}")
                continue
            file = (self.images / f"{image}{self.extension}").resolve()
            if not file.is_relative_to(self.root):
                self._skip(self.csv_path, line, f"{image!r} points outside {self.root}")
                continue
            relative = file.relative_to(self.root).as_posix()
            if relative in seen:
                self._skip(self.csv_path, line, f"{relative} already listed on {seen[relative]}")
                continue
            if not file.is_file():
                self._skip(self.csv_path, line, f"image file {relative} not found")
                continue
            raw = record[self.label_column].strip() if self.label_column else str(self.fixed_label)
            if not raw:
                self._skip(self.csv_path, line, f"empty {self.label_column!r}")
                continue
            patient = record[self.patient_column].strip() if self.patient_column else relative
            if not patient:
                self._skip(self.csv_path, line, f"empty {self.patient_column!r}")
                continue
            seen[relative] = line
            view = record[self.view_column].strip() if self.view_column else ""
            yield {
                **{column: record[column].strip() for column in extras},
                "image_id": file.relative_to(self.images).as_posix(),
                "path": relative,
                "label": self._label(raw),
                "patient_id": _prefixed(self.name, patient),
                "source": self.name,
                "view": normalize_view(view),
                "origin": mf.REAL,
                "finding": raw,
                "view_raw": view,
            }


ADAPTERS[CovidCXNet.name] = CovidCXNet
ADAPTERS[CsvImageFolder.name] = CsvImageFolder
