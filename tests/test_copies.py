"""Copy detection: re-published films are found, follow-up films and other patients are not."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy.ndimage import gaussian_filter, map_coordinates

from cxrlib.data import copies, dedup
from cxrlib.data import manifest as mf
from cxrlib.data.io import write_png

SIZE = 192


def anatomy(seed: int) -> np.ndarray:
    """A patient's smooth 'anatomy' (what every film of the patient shares), float."""
    return gaussian_filter(np.random.default_rng(seed).normal(size=(SIZE, SIZE)), 10) * 40


def film(body: np.ndarray, seed: int) -> np.ndarray:
    """One film of ``body``: its own fine structure (noise, trabeculae) on top, ``uint8``."""
    fine = gaussian_filter(np.random.default_rng(seed + 1000).normal(size=body.shape), 1.0) * 60
    return np.clip(body / np.abs(body).max() * 70 + fine + 128, 0, 255).astype(np.uint8)


def bent(body: np.ndarray, seed: int) -> np.ndarray:
    """``body`` a little deformed (breathing, posture): how a follow-up film sees the patient."""
    rng = np.random.default_rng(seed)
    dy, dx = (gaussian_filter(rng.normal(size=body.shape), 12) * 60 for _ in range(2))
    rows, columns = np.mgrid[:SIZE, :SIZE]
    return map_coordinates(body, [rows + dy, columns + dx], mode="nearest")


KINDS: list = [*copies.TRANSFORMS, ["crop", "rotate", "window", "text", "resize", "jpeg"],
               ["pad", "rotate", "gamma", "resize", "jpeg"]]


@pytest.fixture(scope="module")
def cohort() -> dict:
    """11 patients: a film, a follow-up film, and a re-published copy of the first film."""
    n = len(KINDS)
    films = [film(anatomy(i), i) for i in range(n)]
    follow_ups = [film(bent(anatomy(i), 500 + i), 100 + i) for i in range(n)]
    rng = np.random.default_rng(0)
    republished = [copies.republish(films[i], KINDS[i], rng) for i in range(n)]
    return {"n": n, "films": films, "follow_ups": follow_ups, "republished": republished}


def test_republish_is_seeded_and_does_what_it_says():
    image = film(anatomy(0), 0)
    for kind in copies.TRANSFORMS:
        first = copies.republish(image, kind, np.random.default_rng(3))
        again = copies.republish(image, kind, np.random.default_rng(3))
        assert first.dtype == np.uint8 and first.ndim == 2 and np.array_equal(first, again), kind
    assert copies.republish(image, "crop", np.random.default_rng(0)).size < image.size
    assert copies.republish(image, "pad", np.random.default_rng(0)).size > image.size
    assert max(copies.republish(image, "resize", np.random.default_rng(0)).shape) <= 256
    assert (copies.republish(image, "text", np.random.default_rng(0)) == 255).sum() > (image == 255).sum()
    with pytest.raises(ValueError, match="unknown transform 'blur'"):
        copies.republish(image, "blur", np.random.default_rng(0))


def test_trim_borders_removes_padding_only():
    image = film(anatomy(1), 1)
    padded = np.pad(image, ((10, 4), (0, 25)), constant_values=0)
    assert copies.trim_borders(padded).shape == image.shape
    assert copies.trim_borders(image).shape == image.shape


def test_detector_finds_every_republished_film_and_no_follow_up(cohort):
    n = cohort["n"]
    images = cohort["films"] + cohort["follow_ups"] + cohort["republished"]
    result = copies.find_copies([copies.describe(image) for image in images])
    called = {(a, b) for a, b in result.copies[["first", "second"]].itertuples(index=False)}
    assert called == {(i, 2 * n + i) for i in range(n)}  # each film and its copy, nothing else
    pairs = result.pairs
    assert list(pairs.columns) == list(copies.PAIR_COLUMNS) and len(pairs) < len(images) * 6
    assert set(result.seconds) == {"describe", "candidates", "verify"} and min(result.seconds.values()) >= 0
    true = pairs[(pairs["second"] - pairs["first"]) == 2 * n]
    assert true["score"].min() > pairs.loc[~pairs["copy"], "score"].max()
    # verified directly (not only when the index proposes them), follow-ups are not copies
    for i in range(n):
        evidence = copies.verify_pair(copies.describe(cohort["films"][i]), copies.describe(cohort["follow_ups"][i]))
        assert not copies.is_copy(evidence), (i, evidence)


def test_rotation_and_scale_are_measured(cohort):
    image = cohort["films"][0]
    import cv2

    matrix = cv2.getRotationMatrix2D((SIZE / 2, SIZE / 2), 7.0, 1.0)
    rotated = cv2.warpAffine(image, matrix, (SIZE, SIZE))
    evidence = copies.verify_pair(copies.describe(image), copies.describe(rotated))
    assert copies.is_copy(evidence) and abs(abs(evidence.rotation_deg) - 7.0) < 1.0
    assert abs(evidence.scale - 1.0) < 0.05


def test_root_sift_descriptors_are_bytes_of_unit_length(cohort):
    features = copies.describe(cohort["films"][0])
    assert features.descriptors.dtype == np.uint8 and features.descriptors.shape[1] == copies.DESCRIPTOR_DIM
    assert len(features.descriptors) == len(features.points) > 20
    norms = np.linalg.norm(features.descriptors.astype(np.float64) / 255, axis=1)
    assert np.allclose(norms, 1.0, atol=0.02)  # square roots of an L1-normalised histogram
    assert copies.root_sift(None).shape == (0, copies.DESCRIPTOR_DIM)


def test_clipped_pixels_are_marked_and_left_out(cohort):
    image = cohort["films"][1]
    windowed = np.clip((image.astype(np.float32) - 110) * 3.0, 0, 255).astype(np.uint8)
    plain, clipped = copies.describe(image), copies.describe(windowed)
    assert (plain.small == 0).mean() < 0.05  # only the darkest levels of an unclipped film
    expected = ((windowed <= copies.CLIP_TOLERANCE) | (windowed >= 255 - copies.CLIP_TOLERANCE)).mean()
    assert abs((clipped.small == 0).mean() - expected) < 0.1 and expected > 0.3
    evidence = copies.verify_pair(plain, clipped)
    assert copies.is_copy(evidence), evidence  # the rest of the film still correlates


def test_the_finer_image_is_compared_at_the_coarser_ones_scale(cohort):
    import cv2

    image = cohort["films"][2]
    small = cv2.resize(image, (110, 110), interpolation=cv2.INTER_AREA)
    # the copy shrunk into a textured frame (that trimming cannot remove): its film is coarser
    frame = film(anatomy(99), 99)
    frame[41:151, 41:151] = small
    big, framed = copies.describe(image), copies.describe(frame)
    for first, second in ((big, framed), (framed, big)):
        evidence = copies.verify_pair(first, second)
        # the map always takes the coarser image to the finer one
        assert copies.is_copy(evidence) and 1.5 < evidence.scale < 1.95, evidence


def test_the_inverted_file_index_finds_what_the_exact_one_finds():
    rng = np.random.default_rng(0)
    centres = rng.integers(40, 216, size=(60, copies.DESCRIPTOR_DIM))  # clustered, as keypoints are
    descriptors = np.clip(centres[np.arange(6000) % 60] + rng.integers(-30, 31, size=(6000, copies.DESCRIPTOR_DIM)),
                          0, 255).astype(np.uint8)
    queries = np.clip(descriptors[:500].astype(int) + rng.integers(-3, 4, size=(500, copies.DESCRIPTOR_DIM)),
                      0, 255).astype(np.uint8)
    exact = copies._DescriptorIndex(descriptors)
    # given in blocks, as candidate_pairs gives each image's descriptors
    inverted = copies._DescriptorIndex(np.array_split(descriptors, 7), exact_below=1000)
    assert type(exact.index).__name__ == "IndexFlatL2" and "IVF" in type(inverted.index).__name__
    assert inverted.index.ntotal == exact.index.ntotal == 6000
    for index in (exact, inverted):
        distances, found = index.search(queries, 2)
        hit = found[:, 0] == np.arange(500)
        assert hit.mean() > 0.9 and np.all(distances[:, 0] <= distances[:, 1])
        assert np.allclose(distances[hit, 0], np.linalg.norm(queries[hit].astype(float) - descriptors[:500][hit], axis=1),
                           atol=0.05)  # Euclidean, not squared


def test_the_inverted_file_grows_in_lists_not_in_list_length():
    rng = np.random.default_rng(1)
    centres = rng.integers(40, 216, size=(200, copies.DESCRIPTOR_DIM))
    sizes = {}
    for total in (4000, 16000):
        descriptors = np.clip(centres[np.arange(total) % 200] + rng.integers(-30, 31, size=(total, copies.DESCRIPTOR_DIM)),
                              0, 255).astype(np.uint8)
        index = copies._DescriptorIndex(descriptors, exact_below=1000, list_size=50)
        lengths = [index.index.invlists.list_size(number) for number in range(index.n_lists)]
        assert sum(lengths) == total and index._quantizer.ntotal == index.n_lists
        sizes[total] = (index.n_lists, float(np.mean(lengths)))
    # four times the descriptors: about four times the lists, lists of about the same length
    assert 3.0 < sizes[16000][0] / sizes[4000][0] < 5.0 and 0.7 < sizes[16000][1] / sizes[4000][1] < 1.4, sizes


def test_candidate_pairs_do_not_depend_on_how_the_queries_are_chunked(cohort):
    features = [copies.describe(image) for image in cohort["films"] + cohort["republished"]]
    whole = copies.candidate_pairs(features)
    assert len(whole) >= cohort["n"]  # every film and its copy at least
    for chunk in (1, 150, 1000):  # one image per chunk, a few images, several
        assert copies.candidate_pairs(features, chunk=chunk).equals(whole), chunk


def test_coarse_centroids_give_every_cluster_a_centroid_and_no_more_than_its_points():
    rng = np.random.default_rng(2)
    # one large cluster and a few tiny ones far away: each tiny one still gets its centroid
    sample = np.concatenate([rng.normal(0, 1, size=(3000, 8)), rng.normal(50, 0.1, size=(3, 8)),
                             rng.normal(-50, 0.1, size=(2, 8))]).astype(np.float32)
    centroids = copies._coarse_centroids(sample, 60, seed=0)
    again = copies._coarse_centroids(sample, 60, seed=0)
    assert centroids.dtype == np.float32 and centroids.shape[1] == 8 and np.array_equal(centroids, again)
    assert 40 <= len(centroids) <= 80
    for far in (50, -50):
        assert np.min(np.abs(centroids - far).max(axis=1)) < 1.0  # a centroid on the tiny cluster
    assert len(np.unique(centroids, axis=0)) == len(centroids)


def test_describing_on_threads_gives_the_same_features_in_order(tmp_path, cohort):
    images = cohort["films"][:4] + cohort["republished"][:4]
    alone = [copies.describe(image) for image in images]
    threaded = copies.describe_many(images, workers=2)
    assert [len(f.descriptors) for f in threaded] == [len(f.descriptors) for f in alone]
    for one, other in zip(alone, threaded, strict=True):
        assert np.array_equal(one.descriptors, other.descriptors) and np.array_equal(one.small, other.small)
    paths = []
    for number, image in enumerate(images[:3]):
        paths.append(tmp_path / f"film{number}.png")
        write_png(paths[-1], image)
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not an image")
    described, report = copies.describe_paths([paths[0], broken, paths[1], paths[2]], workers=2)
    assert described[1] is None and report.n_ok == 3 and [bad.path for bad in report.bad] == [str(broken)]
    for features, expected in zip([described[0], described[2], described[3]], alone[:3], strict=True):
        assert np.array_equal(features.descriptors, expected.descriptors)


def test_copies_across_folders_and_manifests_and_the_command(tmp_path, cohort, capsys):
    first, second = tmp_path / "a", tmp_path / "b"
    for index in range(4):
        write_png(first / f"film{index}.png", cohort["films"][index])
        write_png(second / "sub" / f"copy{index}.png", cohort["republished"][index])
    write_png(first / "film0_again.png", cohort["films"][0])  # a copy within a, not across
    (second / "broken.png").write_bytes(b"not an image")
    result = copies.copies_across([first, second])
    found = result.copies
    assert sorted(zip(found["path_first"], found["path_second"], strict=True)) == sorted(
        [(str(first / f"film{i}.png"), str(second / "sub" / f"copy{i}.png")) for i in range(4)]
        + [(str(first / "film0_again.png"), str(second / "sub" / "copy0.png"))])
    assert (result.pairs["input_first"] != result.pairs["input_second"]).all()
    assert [bad.path for bad in result.report.bad] == [str(second / "broken.png")]
    within = copies.copies_across([first]).copies
    assert set(zip(within["path_first"], within["path_second"], strict=True)) == {
        (str(first / "film0.png"), str(first / "film0_again.png"))}
    manifest = pd.DataFrame({"image_id": ["x", "y"], "path": ["a/film1.png", "a/film2.png"]})
    manifest.to_csv(tmp_path / "m.csv", index=False)
    across = copies.copies_across([tmp_path / "m.csv", second]).copies
    assert sorted(across["path_first"]) == ["a/film1.png", "a/film2.png"]

    from cxrlib.__main__ import main

    out = tmp_path / "out" / "pairs.csv"
    assert main(["data", "copies", str(first), str(second), "--out", str(out), "--quiet"]) == 0
    table = pd.read_csv(out)
    assert int(table["copy"].sum()) == 5 and {"score", "inliers", "rotation_deg"} <= set(table.columns)
    assert "5 copies" in capsys.readouterr().out
    with pytest.raises(ValueError, match="neither an image folder nor a manifest"):
        copies.copies_across([tmp_path / "missing"])


def test_deduplicate_uses_the_detector_and_reports_evidence(tmp_path, cohort):
    images = {"a:1": cohort["films"][0], "b:1": cohort["republished"][0],  # cropped copy
              "a:2": cohort["films"][1], "a:2f": cohort["follow_ups"][1],   # follow-up, same patient
              "a:3": cohort["films"][2]}
    rows = []
    for image_id, pixels in images.items():
        name = image_id.replace(":", "_") + ".png"
        write_png(tmp_path / name, pixels)
        rows.append({"image_id": image_id, "path": str(tmp_path / name), "label": "covid",
                     "patient_id": "p2" if image_id.startswith("a:2") else f"p-{image_id}",
                     "source": image_id[0], "view": "PA", "split": "", "mask_path": "", "origin": "real"})
    hashed, _ = dedup.hash_images(pd.DataFrame(rows))
    kept, report = dedup.deduplicate(hashed)
    near = report.table[report.table["kind"] == "near"].set_index("image_id")
    assert set(near.index) == {"a:1", "b:1"}  # the follow-up is not a copy (its patient links it)
    assert near.loc["b:1", "partner"] == "a:1" and near.loc["b:1", "score"] > 0.9
    assert {"inliers", "overlap", "rotation_deg", "scale"} <= set(near.columns)
    by_id = kept.set_index("image_id")
    assert by_id.loc["a:1", "patient_group"] == by_id.loc["b:1", "patient_group"] != ""
    assert len(report.pairs) >= 1 and {"image_id_first", "image_id_second", "copy"} <= set(report.pairs.columns)
    assert report.metrics()["copy_pairs_examined"] == len(report.pairs)
    _, old = dedup.deduplicate(hashed, method="phash")
    assert "b:1" not in set(old.table.loc[old.table["kind"] == "near", "image_id"])  # pHash misses the crop
    with pytest.raises(ValueError, match="method must be"):
        dedup.deduplicate(hashed, method="orb")
    assert mf.check_leakage(mf.split_by_patient(kept, seed=0, stratify=None)).ok


def test_boundary_figure_picks_pairs_on_both_sides(tmp_path, cohort):
    from cxrlib.viz.copies import nearest_boundary, plot_boundary_pairs

    pairs = pd.DataFrame({"score": [0.95, 0.6, 0.5, 0.1, 0.56], "aligned": [True, True, True, True, False],
                          "copy": [True, True, False, False, True]})
    chosen = nearest_boundary(pairs, 0.55, n=2)
    assert chosen["score"].tolist() == [0.6, 0.5]
    write_png(tmp_path / "x.png", cohort["films"][0])
    write_png(tmp_path / "y.png", cohort["republished"][0])
    drawn = pairs.assign(path_first=str(tmp_path / "x.png"), path_second=str(tmp_path / "y.png"),
                         rotation_deg=0.0, scale=1.0)
    plot_boundary_pairs(drawn, 0.55, n=3, out=tmp_path / "fig.png")
    assert (tmp_path / "fig.png").stat().st_size > 1000
