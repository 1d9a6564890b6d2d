"""Oracle "translations" of phantom images: a stand-in for CycleGAN output in tests and benchmarks.

:func:`oracle_synthetic` renders, for every train-split ``normal`` phantom image (as
G_NC would translate it) and every train-split ``pneumonia`` image (as G_PC would), a
new phantom with COVID-19 lesions from the same acquisition site and view, and appends
the rows as notebook 03 does: label ``covid``, ``source`` ``"synthetic"``, ``origin``
``"G_NC:<checkpoint>:<source image id>"`` (or ``G_PC``), the source image's split and
patient. The classifier stage (:mod:`cxrlib.stages.classifiers`) can thus be tested and timed
before a CycleGAN has been trained.

These images are not what a CycleGAN makes: they come from the generator that made the
real COVID-19 phantoms (a perfect "translation" in distribution, though not of the
source patient's anatomy), so they are an upper bound on what synthetic images can add.
No notebook uses them; results obtained with them must never be reported as CycleGAN
results.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from cxrlib.data import manifest as mf
from cxrlib.data.io import write_png
from cxrlib.data.phantom import DEFAULT_SITES, PhantomGenerator

#: Which real class each generator translates (Zunair & Hamza 2021).
GENERATOR_SOURCES: dict[str, str] = {"G_NC": "normal", "G_PC": "pneumonia"}


def _stable_seed(*parts: object) -> int:
    """A 63-bit seed from strings (the same on every machine and Python run)."""
    digest = hashlib.sha256("\x1f".join(str(part) for part in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def oracle_synthetic(
    manifest: pd.DataFrame,
    out_dir: str | os.PathLike,
    *,
    generators: Sequence[str] = ("G_NC", "G_PC"),
    checkpoint: str = "oracle",
    seed: int = 0,
    size: int | None = None,
    severity_range: tuple[float, float] = (0.3, 1.0),
    max_per_generator: int | None = None,
) -> pd.DataFrame:
    """``manifest`` plus one synthetic COVID-19 row per train-split source image of each generator.

    ``manifest``: a split phantom manifest (``site`` column naming a
    :data:`~cxrlib.data.phantom.DEFAULT_SITES` profile; other sites fall back to the
    first). Images are written to ``out_dir/images/<generator>_<image_id>.png`` (an
    existing file is reused) at ``size`` px (default: the phantom's 256). Severity is
    drawn uniformly from ``severity_range``, seeded by ``(seed, generator, image id)``.
    ``max_per_generator`` keeps the first N sources per generator (small tests). Returns
    a new manifest (new paths absolute, like every manifest's in memory) that passes
    :func:`~cxrlib.data.manifest.check_leakage`.
    """
    unknown = sorted(set(generators) - set(GENERATOR_SOURCES))
    if unknown:
        raise ValueError(f"unknown generators {unknown}; choose from {sorted(GENERATOR_SOURCES)}")
    out_dir = Path(out_dir).resolve()
    sites = {site.name: site for site in DEFAULT_SITES}
    render_size = int(size or 256)
    generator = PhantomGenerator(render_size, seed=seed)
    real = manifest[manifest["origin"] == mf.REAL]
    rows = []
    for name in generators:
        sources = real[(real["split"] == "train") & (real["label"] == GENERATOR_SOURCES[name])]
        if max_per_generator is not None:
            sources = sources.iloc[:max_per_generator]
        for source in sources.to_dict("records"):
            image_id = f"{name}_{source['image_id']}"
            path = out_dir / "images" / f"{image_id}.png"
            sample_seed = _stable_seed(seed, name, source["image_id"])
            if not path.is_file():
                severity = float(np.random.default_rng(sample_seed).uniform(*severity_range))
                view = source.get("view") if source.get("view") in ("PA", "AP") else "PA"
                sample = generator.render("covid", sample_seed, severity=severity, view=view,
                                          site=sites.get(str(source.get("site", "")), DEFAULT_SITES[0]))
                write_png(path, sample.image)
            rows.append({
                "image_id": image_id,
                "path": str(path),
                "label": "covid",
                "patient_id": source["patient_id"],
                "source": "synthetic",
                "view": source.get("view", ""),
                "split": source["split"],
                "mask_path": "",
                "origin": mf.make_origin(name, checkpoint, source["image_id"]),
                "site": source.get("site", ""),
            })
    synthetic = pd.DataFrame(rows).reindex(columns=manifest.columns)
    combined = pd.concat([manifest, synthetic], ignore_index=True)
    combined = combined.fillna("").astype(object)
    return combined
