"""Text segmentation, inpainting and their scores, on tiny phantom images rendered here."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from cxrlib import textclean as tc
from cxrlib.data.phantom import CohortConfig, write_cohort

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    folder = tmp_path_factory.mktemp("phantom")
    return write_cohort(folder, CohortConfig(n_patients=4, size=64, seed=0), progress=False)


def test_clean_twins_and_text_data(cohort):
    data = tc.load_text_data(cohort)
    assert data["images"].shape == data["masks"].shape == data["clean"].shape
    # the twin differs from the image exactly where the text is (text pixels are 255, never the clean value)
    differs = data["images"] != data["clean"]
    assert np.array_equal(differs, data["masks"])
    small = tc.load_text_data(cohort, size=32, clean=False)
    assert small["images"].shape[1:] == (32, 32) and "clean" not in small


def test_missing_twin_and_mask_are_named(cohort, tmp_path):
    rows = cohort.copy()
    rows.loc[rows.index[0], "path"] = str(tmp_path / "elsewhere" / "p.png")
    with pytest.raises(FileNotFoundError, match="text-free twin"):
        tc.clean_twin_paths(rows)
    with pytest.raises(ValueError, match="mask_text"):
        tc.load_text_data(cohort.drop(columns=["mask_text"]))


def test_crop_dataset_is_seeded_and_finds_text(cohort):
    data = tc.load_text_data(cohort, clean=False)
    dataset = tc.TextCropDataset(data["images"], data["masks"], crop=16, text_fraction=1.0, seed=3)
    image, labels = dataset[0]
    assert image.shape == (1, 16, 16) and labels.shape == (16, 16) and labels.dtype == torch.int64
    again, _ = dataset[0]
    assert torch.equal(image, again)
    dataset.set_epoch(1)
    assert not torch.equal(dataset[0][0], image)
    assert np.mean([dataset[i][1].sum().item() > 0 for i in range(len(dataset))]) > 0.8
    with pytest.raises(ValueError, match="larger than the images"):
        tc.TextCropDataset(data["images"], data["masks"], crop=128)


def test_segmenter_trains_resumes_and_segments(cohort, tmp_path):
    data = tc.load_text_data(cohort, clean=False)
    config = tc.TextSegConfig(base_channels=4, depth=2, crop=32, epochs=1, steps_per_epoch=25, batch_size=8, lr=1e-2,
                              device="cpu", progress=False)
    segmenter = tc.train_text_segmenter(data["images"], data["masks"], tmp_path, config)
    assert (tmp_path / "last.pt").is_file() and len(segmenter.history) == 1
    # text pixels are the brightest value in the image: a few steps already find most of them
    predicted = tc.predict_text_masks(segmenter, data["images"])
    assert predicted.shape == data["masks"].shape
    assert tc.mask_dice(predicted, data["masks"])["dice"] > 0.5
    more = tc.train_text_segmenter(data["images"], data["masks"], tmp_path,
                                   tc.TextSegConfig(**{**config.__dict__, "epochs": 2}))
    assert more.history["epoch"].tolist() == [1, 2]
    loaded = tc.load_text_segmenter(tmp_path)
    assert np.array_equal(tc.predict_text_masks(loaded, data["images"]), tc.predict_text_masks(more, data["images"]))


def test_telea_changes_only_the_mask_and_beats_leaving_text(cohort):
    data = tc.load_text_data(cohort)
    masks = tc.grow(data["masks"], 1)
    restored = tc.inpaint_telea(data["images"], masks)
    assert np.array_equal(restored[~masks], data["images"][~masks])
    before = tc.text_region_scores(data["images"], data["clean"], data["masks"])
    after = tc.text_region_scores(restored, data["clean"], data["masks"])
    assert after["psnr"] > before["psnr"] + 5
    perfect = tc.text_region_scores(data["clean"], data["clean"], data["masks"])
    assert perfect["psnr"] == 100.0 and perfect["ssim"] == pytest.approx(1.0)


def test_region_scores_and_dice_values():
    reference = np.full((8, 8), 100, np.uint8)
    restored = reference.copy()
    mask = np.zeros((8, 8), bool)
    mask[2:4, 2:4] = True
    restored[mask] = 110  # error 10 in the region: PSNR = 20 log10(255 / 10)
    assert tc.region_psnr(restored, reference, mask) == pytest.approx(20 * np.log10(25.5))
    assert np.isnan(tc.region_psnr(restored, reference, np.zeros_like(mask)))
    assert tc.mask_dice(mask[None], mask[None])["dice"] == 1.0
    half = mask.copy()
    half[2:4, 3] = False
    assert tc.mask_dice(half[None], mask[None])["dice"] == pytest.approx(2 * 2 / (2 + 4))


def test_diffusion_inpainting_pastes_only_inside_the_mask(cohort):
    from cxrlib.models.diffusion import DiffusionConfig, DiffusionModel

    torch.manual_seed(0)
    model = DiffusionModel(DiffusionConfig(image_size=16, block_out_channels=(8, 16), norm_num_groups=4,
                                           num_train_timesteps=20))
    data = tc.load_text_data(cohort)
    filled = tc.inpaint_diffusion(model, data["images"][:2], data["masks"][:2], num_inference_steps=2, resample=1)
    assert filled.shape == data["images"][:2].shape
    assert np.array_equal(filled[~data["masks"][:2]], data["images"][:2][~data["masks"][:2]])
    assert not np.array_equal(filled[data["masks"][:2]], data["images"][:2][data["masks"][:2]])


def test_clean_manifest_writes_cleaned_copies_and_lists_bad_files(cohort, tmp_path):
    data = tc.load_text_data(cohort, clean=False)
    config = tc.TextSegConfig(base_channels=4, depth=2, crop=32, epochs=1, steps_per_epoch=2, batch_size=4,
                              device="cpu", progress=False)
    segmenter = tc.train_text_segmenter(data["images"], data["masks"], tmp_path / "seg", config)
    manifest = cohort.copy()
    manifest.loc[manifest.index[1], "path"] = str(tmp_path / "images" / "missing.png")
    seen = []

    def fill(images, masks):
        seen.append(masks.shape)
        return np.where(masks, 0, images).astype(np.uint8)

    cleaned, problems = tc.clean_manifest(manifest, segmenter, tmp_path / "clean", method=fill, progress=False)
    assert len(problems) == 1 and "missing.png" in problems[0]
    assert len(cleaned) == len(manifest) - 1 and seen
    assert all((tmp_path / "clean" / f"{i}.png").is_file() for i in cleaned["image_id"])
    assert isinstance(cleaned, pd.DataFrame) and cleaned["path"].str.contains("clean/").all()
    with pytest.raises(ValueError, match="method"):
        tc.clean_manifest(manifest, segmenter, tmp_path / "x", method="magic")


def test_sample_folder_images_is_seeded_reads_any_case_and_lists_bad_files(tmp_path):
    from cxrlib.data.io import write_png

    folder = tmp_path / "real"
    for k in range(5):
        write_png(folder / ("sub" if k % 2 else "") / f"img{k}.PNG", np.full((40, 30), 20 * k, np.uint8))
    (folder / "broken.png").write_bytes(b"not an image")
    (folder / "notes.txt").write_text("not an image either")
    images, paths, problems = tc.sample_folder_images(folder, 10, size=16, seed=1)
    assert images.shape == (5, 16, 16) and images.dtype == np.uint8
    assert sorted(p.name for p in paths) == [f"img{k}.PNG" for k in range(5)]
    assert len(problems) == 1 and "broken.png" in problems[0]
    # seeded draw of fewer images: the same files again, another seed another order
    again = tc.sample_folder_images(folder, 3, size=16, seed=1)[1]
    assert again == tc.sample_folder_images(folder, 3, size=16, seed=1)[1] and len(again) == 3
    assert any(tc.sample_folder_images(folder, 3, size=16, seed=s)[1] != again for s in range(2, 6))
    with pytest.raises(FileNotFoundError, match="not a folder"):
        tc.sample_folder_images(tmp_path / "missing", 2)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no image file"):
        tc.sample_folder_images(tmp_path / "empty", 2)
