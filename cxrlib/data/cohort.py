"""Assemble a cohort: make or load the images, check them, split by patient, check leakage.

This is the logic behind notebook 01. It reads a manifest, never edits raw files, and returns
a new manifest (with ``content_hash`` and ``split``) plus a report whose numbers go into
``RUN_DIR/01_data/metrics.json``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from cxrlib import config
from cxrlib.data import manifest as mf


def phantom_cohort_dir(
    n_patients: int,
    size: int,
    seed: int,
    site_label_correlation: float = 0.0,
    base: Path | None = None,
) -> Path:
    """Cache folder of a phantom cohort; its name encodes every setting that changes the images,
    including the generator version."""
    from cxrlib.data.phantom import GENERATOR_VERSION

    base = Path(base) if base is not None else config.data_dir()
    corr = f"-c{site_label_correlation:g}" if site_label_correlation else ""
    return base / f"phantom-v{GENERATOR_VERSION}-{n_patients}p-{size}px-s{seed}{corr}"


def load_or_make_phantom(
    n_patients: int,
    size: int = 256,
    seed: int = 0,
    *,
    site_label_correlation: float = 0.0,
    base: Path | None = None,
    progress: bool = True,
) -> pd.DataFrame:
    """Return the phantom cohort's manifest, generating it once into the data cache.

    The cohort is regenerated only when its ``manifest.csv`` is missing (a cohort is written
    image by image and the manifest last, so a half-written cohort has no manifest).
    """
    from cxrlib.data.phantom import CohortConfig, write_cohort

    out = phantom_cohort_dir(n_patients, size, seed, site_label_correlation, base)
    manifest_path = out / "manifest.csv"
    if not manifest_path.exists():
        write_cohort(
            out,
            CohortConfig(
                n_patients=n_patients,
                seed=seed,
                size=size,
                site_label_correlation=site_label_correlation,
            ),
            progress=progress,
        )
    return mf.read_manifest(manifest_path)


@dataclass
class AssemblyReport:
    """What the quality checks found and what the split looks like."""

    n_input: int
    unreadable: pd.DataFrame
    duplicates: pd.DataFrame
    leakage: mf.LeakageReport
    summary: dict = field(default_factory=dict)

    def metrics(self) -> dict:
        """Plain-JSON numbers for ``metrics.json``."""
        groups = self.duplicates["content_hash"].nunique() if len(self.duplicates) else 0
        return {
            **self.summary,
            "n_input": int(self.n_input),
            "n_unreadable": int(len(self.unreadable)),
            "unreadable_files": self.unreadable["path"].tolist() if len(self.unreadable) else [],
            "n_duplicate_images": int(len(self.duplicates)),
            "n_duplicate_groups": int(groups),
            "leakage": self.leakage.summary(),
            "leakage_ok": bool(self.leakage.ok),
        }


def assemble(
    df: pd.DataFrame,
    *,
    seed: int = 0,
    fractions: tuple[float, float, float] = (0.7, 0.15, 0.15),
    progress: bool = False,
) -> tuple[pd.DataFrame, AssemblyReport]:
    """Hash every image, drop unreadable ones, split by patient, check leakage.

    Identical images (same decoded pixels) are kept but their patients are grouped, so all
    copies land in one split. Returns the split manifest and the report; raises
    :class:`cxrlib.data.manifest.LeakageError` if the split leaks (it should never).
    """
    n_input = len(df)
    hashed, load_report = mf.add_content_hashes(df, progress=progress)
    unreadable = load_report.to_frame()
    readable = hashed[hashed["content_hash"] != ""].copy()
    readable.attrs.update(df.attrs)
    duplicates = mf.find_duplicates(readable)
    split = mf.split_by_patient(readable, fractions=fractions, seed=seed)
    split.attrs.update(df.attrs)
    leakage = mf.check_leakage(split, raise_on_leak=True)
    report = AssemblyReport(
        n_input=n_input,
        unreadable=unreadable,
        duplicates=duplicates,
        leakage=leakage,
        summary=mf.summarize(split),
    )
    return split, report
