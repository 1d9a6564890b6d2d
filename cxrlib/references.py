"""The references page, ``docs/references.md``: the works this project reproduces and every
dataset an adapter reads, each with its license or terms, rendered from one source each.

- Datasets: the adapter classes' own metadata (``title``, ``citation``, ``license``, ``url``
  on each :class:`cxrlib.data.sources.DatasetAdapter` in :data:`~cxrlib.data.sources.ADAPTERS`);
  how to get each comes from :data:`cxrlib.data.download.SOURCES`.
- Works: :data:`WORKS` below.

``python -m cxrlib docs references`` rewrites the page; ``--check`` only compares.
``tests/test_citation.py`` fails when the committed page differs from :func:`render_references`,
so a new adapter or a changed license shows up in the docs or the test suite says so.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from cxrlib.config import PROJECT_ROOT
from cxrlib.data.download import SOURCES, DirectSource, Source
from cxrlib.data.sources import ADAPTERS, DatasetAdapter, ZunairSyntheticCovid

#: Where the page lives, relative to the project root.
PAGE: Path = Path("docs") / "references.md"
#: Metadata every registered adapter must carry (class attributes).
ADAPTER_FIELDS: tuple[str, ...] = ("title", "citation", "license", "url")


@dataclass(frozen=True)
class Work:
    """A published work the project reproduces or leans on."""

    short: str  #: how the docs and notebooks name it, e.g. "Zunair & Hamza 2021"
    citation: str
    taken: str  #: what this project reproduces or takes from it
    notebooks: str  #: the notebooks where it appears, e.g. "03, 04"


WORKS: tuple[Work, ...] = (
    Work(
        short="Zunair & Hamza 2021",
        citation=ZunairSyntheticCovid.citation,
        taken="two unpaired CycleGANs (Normal -> COVID-19 `G_NC`, Pneumonia -> COVID-19 `G_PC`) "
              "translating every training image; VGG16 / ResNet50 / DenseNet121 under heavy "
              "imbalance, real only vs real + synthetic vs synthetic only; UMAP of classifier "
              "features; Grad-CAM",
        notebooks="03, 04, 05",
    ),
    Work(
        short="Oh, Park & Ye 2020",
        citation='Y. Oh, S. Park, J.C. Ye, "Deep learning COVID-19 features on CXR using limited '
                 'training data sets", IEEE Transactions on Medical Imaging 39(8), 2688-2700 (2020)',
        taken="lung segmentation before classification; random lung-centred patches with a "
              "majority vote; probabilistic (patch-averaged) Grad-CAM",
        notebooks="02, 04, 05",
    ),
    Work(
        short="Minaee et al. 2020",
        citation='S. Minaee, R. Kafieh, M. Sonka, S. Yazdani, G.J. Soufi, "Deep-COVID: Predicting '
                 'COVID-19 from chest X-ray images using deep transfer learning", Medical Image '
                 'Analysis 65, 101794 (2020)',
        taken="transfer learning; oversampling and heavy augmentation of the minority class; "
              "sensitivity and specificity over thresholds, ROC AUC",
        notebooks="04",
    ),
    Work(
        short="This X-Ray Does Not Exist 2024",
        citation='"This X-Ray Does Not Exist" (2024); authors and venue are not recorded in this '
                 'repository',
        taken="diffusion synthesis of chest X-rays; burned-in text removal by segmentation and "
              "inpainting; FID against real images (published: 68.4); a blinded real-vs-synthetic "
              "reader study (published: accuracy 0.81, sensitivity 0.86, specificity 0.76)",
        notebooks="06",
    ),
    Work(
        short="DeGrave et al. 2021",
        citation='A.J. DeGrave, J.D. Janizek, S.-I. Lee, "AI for radiographic COVID-19 detection '
                 'selects shortcuts over signal", Nature Machine Intelligence 3, 610-619 (2021)',
        taken="cited, not reproduced: why the shortcut controls (source classifier, lungs removed) "
              "stand next to every classifier result",
        notebooks="04, 05",
    ),
)

#: What the repository's MIT license covers (shown on the page; the README says the same).
LICENSE_NOTE = (
    "The code, notebooks, documentation and figures of this repository are released under the "
    "MIT License ([LICENSE](../LICENSE)). The phantom chest X-rays (images, masks, manifests "
    "made by `cxrlib.data.phantom`) are the project's own and covered by the same license. "
    "Public datasets are never copied into the repository and keep their own terms, listed "
    "below: when you download and read one, those terms bind what you do with its images and "
    "with results or figures that show them."
)


def _cell(text: str) -> str:
    """A Markdown table cell: no line breaks, literal pipes escaped."""
    return " ".join(str(text).split()).replace("|", "\\|")


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_cell(value) for value in row) + " |" for row in rows]
    return lines


def _how_to_get(name: str, sources: Mapping[str, Source]) -> str:
    source = next((s for s in sources.values() if s.adapter == name), None)
    if source is None:
        return "by hand (see the dataset's page)"
    if isinstance(source, DirectSource):
        return f"`python -m cxrlib data download {source.name}`"
    return f"by hand ({source.access}); `python -m cxrlib data download {source.name}` says how"


def check_adapter_metadata(adapters: Mapping[str, type[DatasetAdapter]]) -> None:
    """Raise ``ValueError`` naming the first adapter class that lacks a field of :data:`ADAPTER_FIELDS`."""
    for name, adapter in adapters.items():
        missing = [field for field in ADAPTER_FIELDS if not str(getattr(adapter, field, "")).strip()]
        if missing:
            raise ValueError(
                f"adapter {name!r} ({adapter.__module__}.{adapter.__name__}) lacks "
                f"{', '.join(missing)}: set them as class attributes (see DatasetAdapter)"
            )


def render_references(
    adapters: Mapping[str, type[DatasetAdapter]] | None = None,
    works: Sequence[Work] = WORKS,
    sources: Mapping[str, Source] | None = None,
) -> str:
    """The text of ``docs/references.md`` (Markdown, ends with a newline).

    ``adapters`` defaults to :data:`cxrlib.data.sources.ADAPTERS` (one row per adapter, sorted by
    name), ``sources`` to :data:`cxrlib.data.download.SOURCES`. Raises ``ValueError`` when an
    adapter lacks metadata (:func:`check_adapter_metadata`).
    """
    adapters = ADAPTERS if adapters is None else adapters
    sources = SOURCES if sources is None else sources
    check_adapter_metadata(adapters)
    lines = [
        "# References, licenses and data terms",
        "",
        "<!-- Generated by `python -m cxrlib docs references` from cxrlib/references.py and the",
        "     adapter classes in cxrlib/data/sources.py; edit those, not this page. -->",
        "",
        "How to cite this repository: [CITATION.cff](../CITATION.cff) (GitHub shows it as",
        '"Cite this repository"); please cite the works and datasets below that you use too.',
        "",
        "## License",
        "",
        LICENSE_NOTE,
        "",
        "## Works reproduced",
        "",
        *_table(("work", "reference", "what this project takes from it", "notebooks"),
                [(w.short, w.citation, w.taken, w.notebooks) for w in works]),
        "",
        "## Datasets read by the adapters",
        "",
        "One row per adapter in `cxrlib.data.sources.ADAPTERS` (the name is what",
        "`open_dataset` and the recipes' `adapter:` take). Licenses are as the datasets state",
        "them; read the terms at the source before use.",
        "",
        *_table(("adapter", "dataset", "reference", "license / terms", "where", "how to get it"),
                [(f"`{name}`", a.title, a.citation, a.license, a.url, _how_to_get(name, sources))
                 for name, a in sorted(adapters.items())]),
        "",
    ]
    return "\n".join(lines)


def references_path(root: str | os.PathLike | None = None) -> Path:
    """``<root>/docs/references.md`` (``root`` defaults to the project root)."""
    return Path(PROJECT_ROOT if root is None else root) / PAGE


def write_references(path: str | os.PathLike | None = None) -> Path:
    """Write :func:`render_references` to ``path`` (default :func:`references_path`), atomically."""
    from cxrlib.runs import atomic_write

    target = Path(path) if path is not None else references_path()
    text = render_references()
    atomic_write(target, lambda stream: stream.write(text), mode="w")
    return target


def references_differ(path: str | os.PathLike | None = None) -> str | None:
    """``None`` when the page at ``path`` equals :func:`render_references`, else a one-line reason."""
    target = Path(path) if path is not None else references_path()
    if not target.is_file():
        return f"{target} does not exist; run: python -m cxrlib docs references"
    if target.read_text(encoding="utf-8") != render_references():
        return f"{target} differs from the adapters' metadata; run: python -m cxrlib docs references"
    return None
