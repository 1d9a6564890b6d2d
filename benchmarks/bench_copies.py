"""Copy detection with ground truth: recall per re-publication transform, false copies among
distinct patients, follow-up films not called copies; and throughput / peak memory at scale.

    nice -n 10 python benchmarks/bench_copies.py accuracy [--data /work/shared/realdata] [--n 300]
    nice -n 10 python benchmarks/bench_copies.py scale --sizes 2500 10000 40000
    nice -n 10 python benchmarks/bench_copies.py cross     # covid-cxnet vs covid-chestxray, figures

The images come from folders with patient ids read in place (nothing is copied):
``covid-chestxray`` (ieee8023 layout: ``metadata.csv`` + ``images/``) and ``nih-cxr14-sample``
(``Data_Entry_2017.csv`` + ``images/``) under ``--data``. Positives: every sampled film and a
seeded re-publication of it (:func:`cxrlib.data.copies.republish`: each single transform,
and combinations). Negatives: every other pair of distinct patients in the same run (the
detector decides on all pairs; those it does not examine are non-copies). Follow-ups: all
pairs of different files of one patient, verified directly. Results go to
``benchmarks/results/copies_<mode>.json``.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import resource
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd

from cxrlib.data import copies
from cxrlib.data.io import read_image

RESULTS = Path(__file__).resolve().parent / "results"


def load_average() -> float | None:
    """The 1-minute load average (as ``_common.load_average``, which this script does not
    import: ``_common`` imports torch, whose memory would swamp the peak measured here)."""
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None
#: Combinations a re-publishing site might apply (each ends, as sites do, resized and re-encoded).
COMBINATIONS: dict[str, list[str]] = {
    "crop+window+jpeg": ["crop", "window", "resize", "jpeg"],
    "pad+rotate+gamma": ["pad", "rotate", "gamma", "resize", "jpeg"],
    "crop+rotate+equalize+text": ["crop", "rotate", "equalize", "text", "resize", "jpeg"],
    "rotate+crop+pad+window+text": ["rotate", "crop", "pad", "window", "text", "resize", "jpeg"],
}


def labelled_images(data: Path) -> pd.DataFrame:
    """``path``, ``patient_id``, ``collection`` of every image with a patient id under ``data``."""
    frames = []
    ieee = data / "covid-chestxray"
    if (ieee / "metadata.csv").exists():
        meta = pd.read_csv(ieee / "metadata.csv", dtype=str, keep_default_na=False)
        meta = meta[meta["modality"].eq("X-ray")] if "modality" in meta else meta
        frames.append(pd.DataFrame({"path": [str(ieee / "images" / f) for f in meta["filename"]],
                                    "patient_id": "ieee:" + meta["patientid"],
                                    "collection": "covid-chestxray"}))
    nih = data / "nih-cxr14-sample"
    if (nih / "Data_Entry_2017.csv").exists():
        meta = pd.read_csv(nih / "Data_Entry_2017.csv", dtype=str, keep_default_na=False)
        frames.append(pd.DataFrame({"path": [str(nih / "images" / f) for f in meta["Image Index"]],
                                    "patient_id": "nih:" + meta["Patient ID"],
                                    "collection": "nih-cxr14-sample"}))
    if not frames:
        raise SystemExit(f"{data}: neither covid-chestxray/metadata.csv nor nih-cxr14-sample/Data_Entry_2017.csv")
    table = pd.concat(frames, ignore_index=True)
    return table[table["path"].map(lambda p: Path(p).exists())].reset_index(drop=True)


def sample_with_follow_ups(table: pd.DataFrame, n: int, seed: int) -> pd.DataFrame:
    """``n`` images, patients with several films first (so follow-ups are in the sample)."""
    rng = np.random.default_rng(seed)
    counts = table["patient_id"].map(table["patient_id"].value_counts())
    order = np.lexsort((rng.random(len(table)), (counts <= 1).to_numpy()))
    multi = table.iloc[order[:n // 2]]
    rest = table.drop(index=multi.index).sample(n=min(n - len(multi), len(table) - len(multi)),
                                                random_state=seed)
    return pd.concat([multi, rest]).reset_index(drop=True)


#: Thresholds of band-pass correlation the accuracy run sweeps (``min_tight_share`` kept).
THRESHOLDS = (0.3, 0.35, 0.4, 0.45, 0.5, 0.55, 0.6, 0.65, 0.7)


def _effective(row, settings: copies.CopySettings) -> float:
    """A pair's score when its map is a tight, plausible re-publication, else -1 (never a copy)."""
    evidence = copies.PairEvidence(
        inliers=int(row.inliers), correlation=float(row.correlation),
        coarse_correlation=float(row.coarse_correlation), overlap=float(row.overlap),
        rotation_deg=float(row.rotation_deg), scale=float(row.scale), aligned=bool(row.aligned),
        tight_share=float(row.tight_share))
    return evidence.correlation if copies.is_copy(evidence, replace(settings, min_correlation=-1.0)) else -1.0


def _quantiles(values: pd.Series, levels: tuple[float, ...] = (0.05, 0.5, 0.95)) -> list[float]:
    return [round(float(values.quantile(level)), 3) for level in levels] if len(values) else []


def run_accuracy(args: argparse.Namespace) -> dict:
    settings = copies.CopySettings()
    everything = labelled_images(Path(args.data))
    table = sample_with_follow_ups(everything, args.n, args.seed)
    originals = [read_image(path) for path in table["path"]]
    patients = table["patient_id"].to_numpy()
    base = [copies.describe(image, settings) for image in originals]
    n = len(base)

    # copies already in the data (the same film under two patient ids) are not false copies
    own = copies.find_copies(base, settings=settings).pairs
    native = {(a, b) for a, b, is_copy in own[["first", "second", "copy"]].itertuples(index=False)
              if is_copy and patients[a] != patients[b]}
    follow = [(a, b) for a in range(n) for b in range(a + 1, n) if patients[a] == patients[b]]
    # follow-ups: every pair of films of one patient in the whole folder (up to --follow-ups)
    by_patient = everything.groupby("patient_id").indices
    every_follow = [(int(a), int(b)) for rows in by_patient.values() for i, a in enumerate(rows)
                    for b in rows[i + 1:]]
    chosen = np.random.default_rng(args.seed).permutation(len(every_follow))[:args.follow_ups]
    follow_paths = [(everything["path"][every_follow[c][0]], everything["path"][every_follow[c][1]])
                    for c in sorted(chosen)]
    described: dict[str, copies.ImageFeatures] = {}
    pixels: dict[str, str] = {}
    for path in sorted({p for pair in follow_paths for p in pair}):
        image = read_image(path)
        described[path] = copies.describe(image, settings)
        pixels[path] = hashlib.sha1(image.tobytes() + str(image.shape).encode()).hexdigest()
    # two files of one patient with identical decoded pixels are one film stored twice, not a
    # follow-up: counted apart (the detector should call them copies)
    same_film = [pair for pair in follow_paths if pixels[pair[0]] == pixels[pair[1]]]
    follow_paths = [pair for pair in follow_paths if pixels[pair[0]] != pixels[pair[1]]]
    follow_evidence = [copies.verify_pair(described[a], described[b], settings) for a, b in follow_paths]
    follow_called = [copies.is_copy(evidence, settings) for evidence in follow_evidence]
    loose = replace(settings, min_correlation=-1.0)
    follow_scores = [e.correlation if copies.is_copy(e, loose) else -1.0 for e in follow_evidence]
    true_scores: dict[str, list[float]] = {}
    false_scores: list[float] = []

    n_distinct_pairs_base = n * (n - 1) // 2 - len(follow)
    kinds = {name: [name] for name in copies.TRANSFORMS} | COMBINATIONS
    per_kind, false_pairs, examined_distinct, all_distinct = {}, [], 0, 0
    distinct_scores: list[float] = []
    started = time.perf_counter()
    for number, (name, steps) in enumerate(kinds.items()):
        rng = np.random.default_rng([args.seed, number])
        copied = [copies.describe(copies.republish(image, steps, rng), settings) for image in originals]
        pairs = copies.find_copies(base + copied, settings=settings).pairs
        patient_of = np.concatenate([patients, patients])
        origin = np.concatenate([np.arange(n), np.arange(n)])
        found = {(int(a), int(b)) for a, b in pairs.loc[pairs["copy"], ["first", "second"]].to_numpy()}
        hits = sum((i, n + i) in found for i in range(n))
        true = pairs[(pairs["second"] - pairs["first"]) == n]
        effective = {(int(r.first), int(r.second)): _effective(r, settings) for r in pairs.itertuples(index=False)}
        true_scores[name] = [effective.get((i, n + i), -1.0) for i in range(n)]
        for (a, b), value in effective.items():
            key = (min(origin[a], origin[b]), max(origin[a], origin[b]))
            if patient_of[a] != patient_of[b] and key not in native:
                false_scores.append(value)
        distinct_scores.extend(pairs.loc[patient_of[pairs["first"]] != patient_of[pairs["second"]]
                                         ].query("aligned")["score"].tolist())
        distinct = pairs[patient_of[pairs["first"]] != patient_of[pairs["second"]]]
        examined_distinct += len(distinct)
        all_distinct += 2 * n * (2 * n - 1) // 2 - (n + 4 * len(follow))
        for a, b in distinct.loc[distinct["copy"], ["first", "second"]].to_numpy():
            key = (min(origin[a], origin[b]), max(origin[a], origin[b]))
            if key not in native:
                false_pairs.append({"kind": name, "first": table["path"][origin[a]],
                                    "second": table["path"][origin[b]]})
        per_kind[name] = {"recall": round(hits / n, 4), "hits": hits, "n": n,
                          "candidates_found": len(true), "pairs_examined": len(pairs),
                          "score_quantiles_5_50_95": _quantiles(true["score"])}
        print(f"{name:30s} recall {hits / n:.3f} ({hits}/{n}), {len(pairs)} pairs examined", flush=True)
    return {
        "n_images": n, "n_patients": int(pd.Series(patients).nunique()), "seed": args.seed,
        "settings": copies.CopySettings().__dict__,
        "recall": per_kind,
        "sweep": [{"min_correlation": t,
                   "recall": {name: round(float(np.mean(np.array(v) >= t)), 4) for name, v in true_scores.items()},
                   "false_copies": int((np.array(false_scores) >= t).sum()),
                   "follow_up_not_copy_rate": round(float(np.mean(np.array(follow_scores) < t)), 4)
                   if follow_scores else None} for t in THRESHOLDS],
        "distinct_patient_pairs": all_distinct, "distinct_patient_pairs_examined": examined_distinct,
        "false_copies": len(false_pairs),
        "false_copy_rate": len(false_pairs) / max(all_distinct, 1),
        "false_copy_rate_among_examined": len(false_pairs) / max(examined_distinct, 1),
        "false_copy_examples": false_pairs[:20],
        "copies_in_data_across_patient_ids": len(native),
        "distinct_patient_pairs_in_originals": n_distinct_pairs_base,
        "distinct_patient_aligned_score_quantiles_50_95_99_max": _quantiles(
            pd.Series(distinct_scores), (0.5, 0.95, 0.99, 1.0)),
        "follow_up_score_quantiles_50_95_99_max": _quantiles(
            pd.Series([e.correlation for e in follow_evidence]), (0.5, 0.95, 0.99, 1.0)),
        "follow_up_pairs_in_sample": len(follow),
        "follow_up_not_copy_rate": round(1 - float(np.mean(follow_called)), 4) if follow_called else None,
        "follow_up_pairs_verified": len(follow_paths),
        "same_film_pairs_of_one_patient": len(same_film),
        "same_film_pairs_called_copy": sum(copies.is_copy(copies.verify_pair(described[a], described[b], settings),
                                                          settings) for a, b in same_film),
        "follow_up_called_copy": [pair for pair, called in zip(follow_paths, follow_called, strict=True)
                                  if called][:20],
        "seconds": round(time.perf_counter() - started, 1),
        "load_average": load_average(),
    }


def run_one_size(args: argparse.Namespace) -> dict:
    """Describe ``--size`` images (films of the sample, each re-published at random) and find
    the copies among them; time and peak memory of this process."""
    settings = copies.CopySettings()
    table = labelled_images(Path(args.data))
    originals = [read_image(path) for path in table["path"][: args.n]]
    rng = np.random.default_rng(args.seed)
    kinds = list(copies.TRANSFORMS)
    # the interpreter, the libraries and the source films, before any image is described
    baseline_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    features, describe_s = [], 0.0
    for batch_start in range(0, args.size, 256):  # generated 256 at a time (not timed), then described
        batch = []
        for index in range(batch_start, min(batch_start + 256, args.size)):
            image = originals[index % len(originals)]
            if index >= len(originals):  # later rounds: the same films re-published
                image = copies.republish(image, list(rng.choice(kinds, size=2, replace=False)), rng)
            batch.append(image)
        started = time.perf_counter()
        features += copies.describe_many(batch, settings, workers=args.workers)
        describe_s += time.perf_counter() - started
    started = time.perf_counter()
    result = copies.find_copies(features, settings=settings)
    detect_s = time.perf_counter() - started
    # every image has other versions of its film (index modulo the source films): how many
    # are called a copy of at least one of them, and how many copies join different films
    film = np.arange(args.size) % len(originals)
    called = result.pairs[result.pairs["copy"]]
    same = film[called["first"].to_numpy()] == film[called["second"].to_numpy()]
    linked = np.zeros(args.size, dtype=bool)
    linked[called["first"].to_numpy()[same]] = linked[called["second"].to_numpy()[same]] = True
    return {"images": args.size, "describe_s": round(describe_s, 1),
            "workers": args.workers or copies.default_workers(),
            "images_called_copy_of_own_film": round(float(linked.mean()), 4),
            "copies_across_source_films": int((~same).sum()),
            "candidates_and_verify_s": round(detect_s, 1),
            "candidates_s": round(result.seconds["candidates"], 1), "verify_s": round(result.seconds["verify"], 1),
            "total_s": round(describe_s + detect_s, 1), "pairs_examined": len(result.pairs),
            "copies": int(result.pairs["copy"].sum()),
            "cpu_s": round(resource.getrusage(resource.RUSAGE_SELF).ru_utime
                           + resource.getrusage(resource.RUSAGE_SELF).ru_stime, 1),
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            "baseline_rss_mb": round(baseline_mb, 1), "source_films": len(originals),
            "load_average": load_average()}


def cpu() -> dict:
    """The CPU the timings come from (read from ``/proc/cpuinfo``; no torch, see above)."""
    model, flags = "unknown", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and model == "unknown":
                model = value.strip()
            elif key.strip() == "flags" and not flags:
                flags = set(value.split())
    except OSError:
        pass
    return {"model": model, "cores": copies.default_workers(),
            "simd": [flag for flag in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if flag in flags]}


def run_scale(args: argparse.Namespace) -> dict:
    import json

    rows = []
    for size in args.sizes:
        command = [sys.executable, __file__, "one-size", "--size", str(size), "--data", args.data,
                   "--n", str(args.n), "--seed", str(args.seed)]
        if args.workers:
            command += ["--workers", str(args.workers)]
        output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
        rows.append(json.loads(output.strip().splitlines()[-1]))
        print(rows[-1], flush=True)
    return {"sizes": rows, "settings": copies.CopySettings().__dict__, "cpu": cpu(),
            "index": {"list_size": copies.LIST_SIZE, "nprobe": copies.NPROBE}}


def run_cross(args: argparse.Namespace) -> dict:
    """``covid-cxnet`` against ``covid-chestxray``: the pairs (CSV), and two figures to check by
    eye, 12 copies drawn at random and the 12 lowest-scored copies (written beside the JSON;
    they show dataset images, so they stay out of the repository)."""
    from cxrlib.viz.copies import plot_pairs

    data = Path(args.data)
    inputs = [data / "covid-cxnet", data / "covid-chestxray"]
    started = time.perf_counter()
    result = copies.copies_across(inputs)
    seconds = time.perf_counter() - started
    RESULTS.mkdir(parents=True, exist_ok=True)
    copies.write_pairs(result, RESULTS / "copies_cross_pairs.csv")
    called = result.copies
    plot_pairs(called.sample(min(12, len(called)), random_state=args.seed), title="copies drawn at random",
               out=RESULTS / "copies_cross_random.png")
    plot_pairs(called.nsmallest(12, "score"), title="lowest-scored copies", out=RESULTS / "copies_cross_lowest.png")
    bins = [-1.0, 0.5, 0.6, 0.8, 0.9, 0.95, 1.01]
    return {"inputs": [str(path) for path in inputs], "pairs_examined": len(result.pairs),
            "copies": len(called), "first_images_in_copies": int(called["first"].nunique()),
            "second_images_in_copies": int(called["second"].nunique()),
            "copy_scores": {str(interval): int(count) for interval, count in
                            pd.cut(called["score"], bins).value_counts().sort_index().items()},
            "seconds": round(seconds, 1), "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            "load_average": load_average(), "unreadable": len(result.report.bad)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", choices=["accuracy", "scale", "one-size", "cross"])
    parser.add_argument("--data", default="/work/shared/realdata",
                        help="folder holding covid-chestxray/ and/or nih-cxr14-sample/")
    parser.add_argument("--n", type=int, default=300, help="films sampled (accuracy) or read (scale)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--follow-ups", type=int, default=600, help="follow-up pairs verified (accuracy)")
    parser.add_argument("--sizes", type=int, nargs="+", default=[2500, 10000, 40000])
    parser.add_argument("--size", type=int, default=2500, help="one-size: number of images")
    parser.add_argument("--workers", type=int, default=None,
                        help="threads describing images (scale; default: the cores this process may use)")
    args = parser.parse_args()
    if args.mode == "one-size":
        import json

        print(json.dumps(run_one_size(args)))
        return
    payload = {"accuracy": run_accuracy, "scale": run_scale, "cross": run_cross}[args.mode](args)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from _common import write_result

    write_result(RESULTS / f"copies_{args.mode}.json", payload)


if __name__ == "__main__":
    main()
