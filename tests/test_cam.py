"""CAM wrappers: layers per architecture, maps that find known evidence, no hook leaks, overlays, patch CAMs."""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from cxrlib.data.classification import ClassificationDataset, make_label_map
from cxrlib.data.io import write_png
from cxrlib.data.manifest import absolute_paths
from cxrlib.data.masks import LungPatchSampler
from cxrlib.explain import cam as cams
from cxrlib.explain.saliency import pointing_game
from cxrlib.models.classifiers import ARCHITECTURES, Classifier, build_classifier

pytestmark = pytest.mark.usefixtures("one_thread")


def bright_square_model() -> Classifier:
    """Class 1 = 'there are bright pixels': a 1x1 conv + ReLU keeps pixels above the grey mean."""
    conv = nn.Conv2d(1, 1, 1, bias=False)
    with torch.no_grad():
        conv.weight.fill_(1.0)
    backbone = nn.Sequential(OrderedDict(block1=nn.Sequential(conv, nn.ReLU())))
    model = Classifier("small_cnn", backbone, feature_dim=1, num_classes=2)
    with torch.no_grad():
        model.head.fc.weight.copy_(torch.tensor([[-1.0], [1.0]]))
        model.head.fc.bias.zero_()
    return model


def hooks_left(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks)
               for m in model.modules())


def test_gradcam_finds_the_evidence_and_nothing_for_the_other_class():
    model = bright_square_model()
    images = torch.zeros(2, 1, 32, 32)
    images[0, 0, 4:12, 18:26] = 1.0
    images[1, 0, 20:28, 2:10] = 1.0
    maps = cams.compute_cams(model, images, method="gradcam", target_class=1, layer="backbone.block1")
    assert maps.shape == (2, 32, 32) and maps.dtype == np.float32
    assert maps.min() >= 0 and maps.max() == pytest.approx(1.0)
    assert pointing_game(maps[0], images[0, 0].numpy() > 0) == 1.0
    assert pointing_game(maps[1], images[1, 0].numpy() > 0) == 1.0
    # class 0 is evidence *against* bright pixels: no positive evidence anywhere
    assert cams.compute_cams(model, images, method="gradcam", target_class=0, layer="backbone.block1").max() == 0.0


@pytest.mark.parametrize("method", list(cams.CAM_METHODS))
def test_every_method_gives_unit_range_maps_and_leaves_no_hooks(method):
    torch.manual_seed(0)
    model = build_classifier("small_cnn", 2)
    model.train()
    images = torch.rand(3, 1, 32, 32)
    maps = cams.compute_cams(model, images, method=method, target_class=[0, 1, 1], batch_size=2)
    assert maps.shape == (3, 32, 32) and np.isfinite(maps).all()
    assert maps.min() >= 0 and maps.max() <= 1
    assert hooks_left(model) == 0
    assert model.training, "the model's training mode is restored"
    assert all(p.grad is None for p in model.parameters())


def test_hooks_are_removed_when_the_cam_fails():
    model = build_classifier("small_cnn", 2)
    with pytest.raises(RuntimeError):
        cams.compute_cams(model, torch.rand(2, 3, 32, 32), method="gradcam", target_class=1)  # 3 channels
    assert hooks_left(model) == 0


def test_predicted_class_is_explained_when_no_target_is_given():
    model = bright_square_model()
    images = torch.zeros(1, 1, 16, 16)
    images[0, 0, 2:6, 2:6] = 1.0
    default = cams.compute_cams(model, images, layer="backbone.block1")
    explicit = cams.compute_cams(model, images, target_class=1, layer="backbone.block1")
    assert np.allclose(default, explicit)


def test_bad_arguments_are_named():
    model = build_classifier("small_cnn", 2)
    images = torch.rand(2, 1, 32, 32)
    with pytest.raises(ValueError, match="unknown CAM method"):
        cams.compute_cams(model, images, method="lime")
    with pytest.raises(ValueError, match="no layer 'backbone.block9'.*block4"):
        cams.compute_cams(model, images, layer="backbone.block9")
    with pytest.raises(ValueError, match="outside 0..1"):
        cams.compute_cams(model, images, target_class=2)
    with pytest.raises(ValueError, match="3 target classes for 2"):
        cams.compute_cams(model, images, target_class=[0, 1, 1])
    with pytest.raises(TypeError, match="Classifier"):
        cams.compute_cams(nn.Linear(2, 2), images)


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_layer_names_resolve_for_every_architecture(arch):
    model = build_classifier(arch, 2)
    names = cams.cam_layer_names(model)
    assert names[-1] == ARCHITECTURES[arch].cam_layer
    for name in names:
        assert isinstance(cams.cam_layer(model, name), nn.Module)
    assert cams.cam_layer(model) is model.get_submodule(ARCHITECTURES[arch].cam_layer)


def test_cam_resolution_is_the_target_layers_grid():
    model = build_classifier("small_cnn", 2)
    assert cams.cam_resolution(model, 48) == (3, 3)
    assert cams.cam_resolution(model, 48, "backbone.block3") == (6, 6)
    assert hooks_left(model) == 0


def test_overlay_on_a_grey_image_is_rgb_and_keeps_the_image():
    ramp = np.tile(np.linspace(0, 255, 20).astype(np.uint8), (10, 1))
    image_only = cams.overlay_cam(ramp, np.zeros((5, 5)), image_weight=1.0)
    assert image_only.shape == (10, 20, 3) and image_only.dtype == np.uint8
    assert (image_only[..., 0] == image_only[..., 1]).all() and (image_only[..., 1] == image_only[..., 2]).all()
    assert (np.diff(image_only[0, :, 0].astype(int)) >= 0).all()
    blended = cams.overlay_cam(ramp / 255.0, np.ones((10, 20)), image_weight=0.5)
    assert blended.shape == (10, 20, 3)
    with pytest.raises(ValueError, match="grey"):
        cams.overlay_cam(np.zeros((10, 20, 3)), np.zeros((10, 20)))


def lung_patch_dataset(tmp_path) -> ClassificationDataset:
    side = 64
    yy, xx = np.mgrid[0:side, 0:side]
    lung = ((yy - 32) / 20) ** 2 + ((xx - 20) / 10) ** 2 <= 1
    rows = []
    rng = np.random.default_rng(0)
    for index in range(2):
        image = np.clip(np.where(lung, 60, 160) + rng.normal(0, 40, (side, side)), 0, 255).astype(np.uint8)
        write_png(tmp_path / f"img{index}.png", image)
        write_png(tmp_path / f"lung{index}.png", lung)
        rows.append({"image_id": f"i{index}", "path": f"img{index}.png", "label": "covid",
                     "mask_pred_lung": f"lung{index}.png"})
    manifest = absolute_paths(pd.DataFrame(rows), tmp_path)
    return ClassificationDataset(manifest, image_size=16, label_map=make_label_map(["normal", "covid"]),
                                 input_mode="patch", patch_sampler=LungPatchSampler(16, scale_with_image=False),
                                 source_size=side)


def test_patch_cam_pastes_probability_weighted_patch_maps_back(tmp_path):
    dataset = lung_patch_dataset(tmp_path)
    model = bright_square_model()
    result = cams.patch_cam(model, dataset, 0, target_class=1, k=6, seed=3, layer="backbone.block1")
    image, lung = dataset.stored(0)
    assert result.cam.shape == image.shape and result.cam.min() >= 0 and result.cam.max() <= 1
    assert result.centres.shape == (6, 2) and lung[result.centres[:, 0], result.centres[:, 1]].all()
    covered = np.zeros(image.shape, dtype=bool)
    for row, col in result.centres:
        covered[max(row - 8, 0):row + 8, max(col - 8, 0):col + 8] = True
    assert (result.cam[~covered] == 0).all() and result.cam.max() == pytest.approx(1.0)
    expected = LungPatchSampler.paste_back(result.patch_maps * result.probabilities[:, None, None],
                                           result.centres, image.shape)
    assert np.allclose(result.cam, expected / expected.max())
    # the same seed draws the same patches
    again = cams.patch_cam(model, dataset, 0, target_class=1, k=6, seed=3, layer="backbone.block1")
    assert np.array_equal(again.centres, result.centres) and np.allclose(again.cam, result.cam)
    with pytest.raises(ValueError, match="patch"):
        cams.patch_cam(model, object(), 0, target_class=1)


def test_explain_rows_of_a_patch_classifier_gives_source_size_maps(tmp_path):
    from cxrlib.explain.embed import extract_features
    from cxrlib.stages.umap_gradcam import explain_rows
    from cxrlib.train.classifier import ClassifierTrainConfig, ClassifierTrainResult

    rows = lung_patch_dataset(tmp_path).manifest
    config = ClassifierTrainConfig(arch="small_cnn", classes=["normal", "covid"], image_size=16, input_mode="patch",
                                   patch_size=16, patch_reference_size=64, patch_source_size=64, eval_patches=3,
                                   progress=False)
    torch.manual_seed(0)
    model = build_classifier("small_cnn", 2).eval()
    checkpoint = tmp_path / "model.pt"
    torch.save(model.state_dict(), checkpoint)
    result = ClassifierTrainResult(model=model, history=pd.DataFrame(), best_epoch=0, best_val_metric=0.5,
                                   threshold=0.5, thresholds={}, checkpoint_path=checkpoint, config=config,
                                   classes=config.classes)
    explained = explain_rows(result, rows, ["gradcam", "eigencam"], target_class=1, patch_k=4, seed=0)
    assert explained.inputs is None and explained.display.shape == (2, 64, 64)
    assert explained.maps["gradcam"].shape == (2, 64, 64) and explained.probabilities.shape == (2, 2)
    assert np.allclose(explained.probabilities.sum(axis=1), 1.0)
    features = extract_features(result, rows)
    assert features.values.shape == (2, 128) and np.isfinite(features.values).all()
