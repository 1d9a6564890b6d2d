"""Adapters that turn public chest X-ray datasets, as downloaded, into manifests.

Every adapter reads a dataset folder in its published layout, never changes or copies a
file, and returns a manifest (:mod:`cxrlib.data.manifest` schema) whose paths are relative
to that folder (``df.attrs["root"]``). Labels are normalised to the project's class names
(:data:`CANONICAL_LABELS`), so that manifests from several sources can be concatenated.

Adding a dataset: subclass :class:`DatasetAdapter`, set ``name``, implement
:meth:`~DatasetAdapter.rows` (one dict per image) and register the class in
:data:`ADAPTERS`; the base class fills the schema, validates and sets the root.

======================  ==================================================================
``covid19-radiography``  :class:`Covid19RadiographyDatabase` (Kaggle, 21,165 PNG images,
                         lung masks for every image)
======================  ==================================================================
"""

from __future__ import annotations

import os
import re
from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, ClassVar

import pandas as pd

from cxrlib.data import manifest as mf

#: Class names used across the project (phantom and real data alike).
CANONICAL_LABELS: tuple[str, ...] = ("normal", "pneumonia", "covid", "lung_opacity")
#: File name endings read as images (compared in lower case).
IMAGE_SUFFIXES: tuple[str, ...] = (".png", ".jpg", ".jpeg")


def _key(raw: str) -> str:
    """``"Viral Pneumonia"`` -> ``"viral_pneumonia"``: lower case, runs of space / ``-`` -> ``_``."""
    return re.sub(r"[\s\-]+", "_", str(raw).strip().lower())


def normalize_label(raw: str, aliases: Mapping[str, str]) -> str:
    """Map a dataset's class name to a canonical label via ``aliases`` (keys as :func:`_key` gives).

    Raises ``ValueError`` naming the unknown class and the known ones, so a new class in a
    new release of a dataset is not silently dropped or mislabelled.
    """
    key = _key(raw)
    if key not in aliases:
        raise ValueError(f"unknown class {raw!r}; known: {sorted(set(aliases))}")
    return aliases[key]


def _image_files(folder: Path) -> list[Path]:
    """Image files directly in ``folder``, sorted by name (hidden files skipped)."""
    return sorted(
        p for p in folder.iterdir()
        if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_SUFFIXES
    )


class DatasetAdapter(ABC):
    """A public dataset in its published folder layout; :meth:`manifest` describes its images.

    ``root`` is the dataset folder; it is only read. Subclasses set :attr:`name` and
    implement :meth:`rows`.
    """

    #: Short registry name, also used as the manifest's ``source`` value.
    name: ClassVar[str] = ""

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root).expanduser().resolve()
        if not self.root.is_dir():
            raise FileNotFoundError(f"{type(self).__name__}: dataset folder {self.root} does not exist")

    @abstractmethod
    def rows(self) -> Iterable[dict[str, Any]]:
        """One dict per image with manifest columns; paths relative to :attr:`root` (POSIX)."""

    def manifest(self) -> pd.DataFrame:
        """The dataset's manifest: schema columns first, all values strings, validated.

        ``attrs["root"]`` is the dataset folder. ``split`` is ``""`` (split later, by patient).
        """
        records = list(self.rows())
        if not records:
            raise ValueError(f"{type(self).__name__}: no images found under {self.root}")
        df = pd.DataFrame(records)
        for column in mf.COLUMNS:
            if column not in df.columns:
                df[column] = ""
        extras = [c for c in df.columns if c not in mf.COLUMNS]
        df = df[[*mf.COLUMNS, *extras]].fillna("").astype(str)
        df.attrs["root"] = str(self.root)
        return mf.validate(df)

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
    #: Class folder (normalised by :func:`_key`) -> canonical label.
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
            p for p in self.root.iterdir() if p.is_dir() and _key(p.name) in self.LABELS
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


#: Registry: name -> adapter class (see :func:`open_dataset`).
ADAPTERS: dict[str, type[DatasetAdapter]] = {
    Covid19RadiographyDatabase.name: Covid19RadiographyDatabase,
}


def open_dataset(name: str, root: str | os.PathLike) -> DatasetAdapter:
    """The adapter registered as ``name`` for the dataset folder ``root``."""
    if name not in ADAPTERS:
        raise ValueError(f"unknown dataset {name!r}; known: {sorted(ADAPTERS)}")
    return ADAPTERS[name](root)
