"""The CycleGAN synthesis stage: synthetic manifest rows, leakage, judges and the per-translator report."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from cxrlib.data import manifest as mf
from cxrlib.data.io import read_image, write_png
from cxrlib.models.cyclegan import CycleGANConfig, build_generator
from cxrlib.stages import cyclegan as syn

pytestmark = pytest.mark.usefixtures("one_thread")

SIZE = 16
SPLITS = {"train": 6, "val": 2, "test": 3}


@pytest.fixture()
def cohort(tmp_path):
    """A tiny 3-class manifest with one image per patient, lung masks and a derived-image column."""
    rng = np.random.default_rng(0)
    data = tmp_path / "data"
    rows = []
    lungs = np.zeros((SIZE * 2, SIZE * 2), dtype=bool)
    lungs[8:24, 4:14] = True
    for label, brightness in (("normal", 60), ("pneumonia", 120), ("covid", 190)):
        for split, count in SPLITS.items():
            for k in range(count):
                image_id = f"{label}_{split}_{k}"
                image = np.clip(rng.normal(brightness, 20, (SIZE * 2, SIZE * 2)), 0, 255).astype(np.uint8)
                write_png(data / "images" / f"{image_id}.png", image)
                write_png(data / "masks" / f"{image_id}_left.png", lungs)
                write_png(data / "masks" / f"{image_id}_right.png", lungs[:, ::-1])
                rows.append({
                    "image_id": image_id, "path": f"images/{image_id}.png", "label": label,
                    "patient_id": f"p_{image_id}", "source": "phantom", "view": "PA", "split": split,
                    "mask_path": "", "origin": "real", "site": "north",
                    "mask_lung_left": f"masks/{image_id}_left.png", "mask_lung_right": f"masks/{image_id}_right.png",
                    "mask_lesion": "", "path_lung_crop": f"images/{image_id}.png", "content_hash": f"h{image_id}",
                })
    written = mf.write_manifest(mf.absolute_paths(pd.DataFrame(rows), data), data / "manifest.csv")
    return mf.read_manifest(written)


@pytest.fixture()
def generator():
    torch.manual_seed(0)
    return build_generator(CycleGANConfig(generator="unet", ngf=4, unet_depth=2, n_layers_d=1, image_size=SIZE)).eval()


def test_generate_synthetic_rows_files_and_leakage(cohort, generator, tmp_path):
    out = tmp_path / "run" / "03_cyclegan" / "synthetic" / "G_NC"
    rows = syn.generate_synthetic(generator, cohort, "normal", "G_NC", "last_epoch001", out, SIZE)
    sources = cohort[(cohort["label"] == "normal") & (cohort["split"] == "train")]
    assert len(rows) == len(sources) == SPLITS["train"]
    assert set(rows["label"]) == {"covid"} and set(rows["source"]) == {"synthetic"} and set(rows["split"]) == {"train"}
    for (_, row), (_, source) in zip(rows.iterrows(), sources.iterrows(), strict=True):
        assert mf.parse_origin(row["origin"]) == ("G_NC", "last_epoch001", source["image_id"])
        assert row["patient_id"] == source["patient_id"] and row["view"] == source["view"]
        assert row["site"] == source["site"] and row["mask_lung_left"] == source["mask_lung_left"]
        assert row["path_lung_crop"] == "" and row["content_hash"] not in ("", source["content_hash"])
        image = read_image(mf.resolve_path(cohort, row["path"]))
        assert image.shape == (SIZE, SIZE) and image.dtype == np.uint8
    assert sorted(p.name for p in out.glob("*.png")) == sorted(f"{i}.png" for i in sources["image_id"])
    assert not list(out.glob("*.tmp"))  # atomic writes leave no temporary files

    combined = syn.add_synthetic(cohort, [rows])
    assert len(combined) == len(cohort) + len(rows)
    written = mf.write_manifest(combined, tmp_path / "run" / "03_cyclegan" / "manifest.csv")
    again = mf.read_manifest(written, allowed_roots=[tmp_path / "data"])  # the cohort lies outside the run
    assert mf.check_leakage(again).ok
    new = syn.synthetic_rows(again, "G_NC")
    assert len(new) == len(rows)
    for value in new["path"]:
        assert mf.resolve_path(again, value).is_file()
    # the source rows come back in the synthetic rows' order
    assert list(syn.source_rows(again, new)["image_id"]) == list(sources["image_id"])
    # re-running replaces the rows instead of duplicating them
    assert len(syn.add_synthetic(combined, [rows])) == len(combined)


def test_synthetic_row_in_another_split_is_a_leak(cohort, generator, tmp_path):
    rows = syn.generate_synthetic(generator, cohort, "normal", "G_NC", "ckpt", tmp_path / "syn", SIZE)
    rows.loc[rows.index[0], "split"] = "test"
    with pytest.raises(mf.LeakageError):
        syn.add_synthetic(cohort, [rows])


def test_load_masks_union_and_empty_cells(cohort):
    rows = cohort.head(2)
    lungs = syn.load_masks(rows, syn.LUNG_MASK_COLUMNS, SIZE)
    assert lungs.shape == (2, SIZE, SIZE) and lungs.dtype == bool
    assert lungs.any() and not lungs.all()
    assert not syn.load_masks(rows, ["mask_lesion"], SIZE).any()


def test_blend_ends_and_range():
    before = np.zeros((4, 4), np.uint8)
    after = np.full((4, 4), 200, np.uint8)
    assert (syn.blend(before, after, 0.0) == before).all()
    assert (syn.blend(before, after, 1.0) == after).all()
    assert (syn.blend(before, after, 0.5) == 100).all()
    with pytest.raises(ValueError):
        syn.blend(before, after, 1.5)


def test_judges_and_evaluate_translator(cohort, generator, tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))  # no Inception weights here
    feature_net = syn.train_feature_network(cohort, tmp_path / "feat", image_size=SIZE, epochs=1, batch_size=8,
                                            device="cpu")
    oracle = syn.train_oracle(cohort, tmp_path / "oracle", image_size=SIZE, epochs=1, batch_size=8, device="cpu")
    assert feature_net.classes == list(syn.FEATURE_CLASSES) and oracle.classes == list(syn.ORACLE_CLASSES)
    assert 0.0 <= syn.oracle_threshold(oracle) <= 1.0
    # a finished run only loads: same weights again
    again = syn.train_oracle(cohort, tmp_path / "oracle", image_size=SIZE, epochs=1, batch_size=8, device="cpu")
    images = syn.load_images(cohort.head(3), SIZE)
    np.testing.assert_allclose(syn.covid_probability(oracle, images), syn.covid_probability(again, images))

    rows = syn.generate_synthetic(generator, cohort, "normal", "G_NC", "ckpt", tmp_path / "syn", SIZE)
    sources = syn.source_rows(cohort, rows)
    covid = {split: syn.real_rows(cohort, split, ["covid"]) for split in ("train", "test")}
    heldout = syn.real_rows(cohort, ["val", "test"], ["covid"])
    report = syn.evaluate_translator(
        source_images=syn.load_images(sources, SIZE), synthetic_images=syn.load_images(rows, SIZE),
        synthetic_groups=sources["patient_id"], real_covid_train=syn.load_images(covid["train"], SIZE),
        real_covid_test=syn.load_images(covid["test"], SIZE), real_covid_heldout=syn.load_images(heldout, SIZE),
        real_covid_heldout_groups=heldout["patient_id"], feature_net=feature_net, oracle=oracle,
        lung_masks=syn.load_masks(sources, syn.LUNG_MASK_COLUMNS, SIZE), n_boot=50)
    headline = syn.headline_metrics(report)
    for key in ("fd_cxr", "fd_cxr_floor", "fd_cxr_untranslated", "kid", "oracle_covid_rate_before",
                "oracle_covid_rate_after", "detectability_auc", "n_generated", "lesion_added_inside_lungs",
                "lesion_added_outside_lungs", "anatomy_ssim", "anatomy_l1",
                "memorisation_possible_copy_fraction"):
        assert key in headline, key
    assert headline["n_generated"] == SPLITS["train"]
    assert headline["fd_cxr"] >= 0 and headline["fd_cxr_untranslated"] >= 0
    assert 0 <= headline["oracle_covid_rate_after"] <= 1 and 0 <= headline["detectability_auc"] <= 1
    # the texture check: the oracle's calls on real COVID-19 test images and on the translations, blurred
    real_test = syn.load_images(covid["test"], SIZE)
    threshold = headline["oracle_threshold"]
    from cxrlib.evaluate.synthesis import binomial_blur

    expected_real = float(np.mean(syn.covid_probability(oracle, real_test) >= threshold))
    expected_blurred = float(np.mean(syn.covid_probability(oracle, binomial_blur(syn.load_images(rows, SIZE)))
                                     >= threshold))
    assert headline["oracle_covid_rate_real"] == pytest.approx(expected_real)
    assert headline["oracle_covid_rate_after_blurred"] == pytest.approx(expected_blurred)
    low, high = headline["oracle_covid_rate_real_blurred_ci95"]
    assert 0 <= low <= headline["oracle_covid_rate_real_blurred"] <= high <= 1
    assert headline["fd_cxr_blurred"] >= 0 and headline["fd_cxr_blurred_floor"] >= 0
    assert headline["fd_cxr_blurred"] != headline["fd_cxr"]
    texture = syn.texture_check_table({"G_NC": report})
    assert texture.shape == (4, 1) and texture.index.name == "oracle calls COVID-19"
    assert texture.loc["real COVID-19 test images", "G_NC"] == (
        f"{expected_real:.2f} ({headline['oracle_covid_rate_real_ci95'][0]:.2f}-"
        f"{headline['oracle_covid_rate_real_ci95'][1]:.2f})")
    assert headline["fid_inception"] is None or headline["fid_inception"] >= 0
    assert isinstance(headline["fid_inception_note"], str)
    # identical source and synthetic images: nothing added, anatomy untouched
    same = syn.load_images(sources, SIZE)
    untouched = syn.evaluate_translator(
        source_images=same, synthetic_images=same, synthetic_groups=sources["patient_id"],
        real_covid_train=syn.load_images(covid["train"], SIZE), real_covid_test=syn.load_images(covid["test"], SIZE),
        real_covid_heldout=syn.load_images(heldout, SIZE), real_covid_heldout_groups=heldout["patient_id"],
        feature_net=feature_net, oracle=oracle, lung_masks=syn.load_masks(sources, syn.LUNG_MASK_COLUMNS, SIZE),
        inception=False, n_boot=20)
    # (at 16 px the grown lung masks leave no pixel for the anatomy measures: NaN, never a change)
    assert untouched["lesion_added_inside_lungs"] == 0 and not untouched["anatomy_l1"] > 0
    assert untouched["oracle_covid_rate_before"] == untouched["oracle_covid_rate_after"]
    assert untouched["fd_cxr"] == pytest.approx(untouched["fd_cxr_untranslated"])
    assert untouched["fd_cxr_blurred"] == pytest.approx(untouched["fd_cxr_blurred_untranslated"])

    # notebook 06's report: the same judge on the covid-conditioned samples, memorisation over every sample
    from cxrlib.stages import diffusion_reader_study as ds

    real = dict(real_covid_train=syn.load_images(covid["train"], SIZE), real_covid_test=syn.load_images(covid["test"], SIZE),
                real_covid_heldout=syn.load_images(heldout, SIZE), real_covid_heldout_groups=heldout["patient_id"],
                feature_net=feature_net, oracle=oracle, n_boot=20)
    train_all = syn.load_images(syn.real_rows(cohort, "train"), SIZE)
    synthetic = syn.load_images(rows, SIZE)
    mixed = np.concatenate([synthetic, train_all[:1], train_all[-1:]])  # two exact copies of training images
    conditioning = np.array(["covid"] * len(synthetic) + ["normal", "covid"])
    diffusion = ds.generator_report(synthetic_images=mixed, conditioning=conditioning, real_train=train_all, **real)
    judged = syn.judge_generator(synthetic_images=mixed[conditioning == "covid"], **real)
    assert diffusion["fd_cxr"] == pytest.approx(judged["fd_cxr"]) and diffusion["kid"] == pytest.approx(judged["kid"])
    assert diffusion["oracle_covid_rate"] == judged["oracle_covid_rate_after"]
    assert diffusion["oracle_covid_rate_blurred"] == judged["oracle_covid_rate_after_blurred"]
    assert diffusion["oracle_covid_rate_real"] == judged["oracle_covid_rate_real"]
    assert diffusion["detectability_auc"] == pytest.approx(judged["detectability_auc"])
    assert diffusion["oracle_covid_rate_before"] is None and judged["fd_cxr_untranslated"] is None
    assert diffusion["n_generated"] == len(mixed) and diffusion["n_target"] == len(synthetic) + 1
    by_class = diffusion["oracle_covid_rate_by_class"]
    assert by_class["normal"]["n"] == 1 and by_class["covid"]["n"] == len(synthetic) + 1
    assert {len(mixed) - 2, len(mixed) - 1} <= set(diffusion["possible_copies"])
    assert diffusion["nearest_train_distance_min"] == 0 and diffusion["nearest_train_distance_p01"] > 0
    assert set(ds.GENERATOR_KEYS) <= set(ds.headline(diffusion))
    assert diffusion["fid_inception"] is None and str(tmp_path / "hub") in diffusion["fid_inception_note"]
    # with Inception weights on the machine every generator gets an Inception FID too (random weights, small
    # input size: this checks the plumbing)
    from torchvision.models import inception_v3

    from cxrlib.evaluate import synthesis as synth

    weights = synth.inception_weights_path()
    weights.parent.mkdir(parents=True)
    torch.manual_seed(0)
    torch.save(inception_v3(weights=None, aux_logits=True, init_weights=False).state_dict(), weights)
    monkeypatch.setattr(synth, "_INCEPTION_SIZE", 75)
    with_fid = ds.generator_report(synthetic_images=mixed[:4], conditioning=conditioning[:4], real_train=train_all,
                                   **real)
    assert with_fid["fid_inception"] >= 0 and "Inception FID =" in with_fid["fid_inception_note"]
    skipped = ds.generator_report(synthetic_images=mixed[:4], conditioning=conditioning[:4], real_train=train_all,
                                  inception=False, **real)
    assert skipped["fid_inception"] is None and skipped["fid_inception_note"] == "not asked for"
    # a translator judged by notebook 06 gets the same numbers as from notebook 03 at the same size
    translator = ds.generator_report(synthetic_images=synthetic, conditioning=["covid"] * len(synthetic),
                                     source_images=syn.load_images(sources, SIZE),
                                     synthetic_groups=sources["patient_id"].tolist(),
                                     **(real | {"n_boot": 50}), real_train=real["real_covid_train"])
    for key in ("fd_cxr", "fd_cxr_floor", "fd_cxr_untranslated", "kid", "oracle_covid_rate_before",
                "detectability_auc"):
        assert translator[key] == pytest.approx(report[key]), key
    assert translator["oracle_covid_rate"] == report["oracle_covid_rate_after"]
    table = ds.comparison_table({"G_NC": translator, "diffusion": diffusion})
    assert list(table.index) == ["G_NC", "diffusion"] and "oracle_normal" in table.columns


@pytest.mark.parametrize("profile", ["quick", "default", "full", "real-cpu"])
def test_profile_sizes_build_a_valid_cyclegan(profile):
    """Each profile's 03 sizes, merged over the notebook defaults as papermill does, make a trainable CycleGAN."""
    from cxrlib.models.cyclegan import CycleGAN
    from cxrlib.stages.runtime import stage_parameters
    from cxrlib.train.cyclegan import CycleGANTrainConfig

    p = stage_parameters("03", profile)
    train_config = CycleGANTrainConfig(
        epochs=p["EPOCHS"], epochs_decay=p["EPOCHS_DECAY"], batch_size=p["BATCH_SIZE"], lr=p["LEARNING_RATE"],
        lambda_id=p["LAMBDA_ID"], image_size=p["IMAGE_SIZE"],
        model={"generator": p["GENERATOR"], "ngf": p["NGF"], "ndf": p["NDF"], "unet_depth": p["UNET_DEPTH"],
               "n_blocks": p["N_BLOCKS"], "n_layers_d": p["N_LAYERS_D"]},
        max_steps_per_epoch=p["MAX_STEPS_PER_EPOCH"] or None)
    model = CycleGAN(train_config.model_config())
    image = torch.zeros(1, 1, p["IMAGE_SIZE"], p["IMAGE_SIZE"])
    with torch.no_grad():
        assert model.G_AB(image).shape == image.shape
        assert model.D_B(image).shape[-1] >= 1
    assert p["NUM_THREADS"] >= 0


def test_real_cpu_profile_translates_at_128_px_with_the_default_networks():
    """real-cpu: the real-data size (128 px) with the default profile's generator and discriminator widths."""
    from cxrlib.stages.runtime import stage_parameters

    default, real = stage_parameters("03", "default"), stage_parameters("03", "real-cpu")
    assert real["IMAGE_SIZE"] == 128 > default["IMAGE_SIZE"]
    assert {key: real[key] for key in ("GENERATOR", "NGF", "NDF", "BATCH_SIZE")} == {
        key: default[key] for key in ("GENERATOR", "NGF", "NDF", "BATCH_SIZE")}
    # one more U-Net level than at the phantom size, so the bottleneck stays small
    assert real["UNET_DEPTH"] > default["UNET_DEPTH"]
