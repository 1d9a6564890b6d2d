"""Classifier factory: every architecture for grey images, pretrained weights offline, features, CAM layers."""

from __future__ import annotations

import re
import warnings

import pytest
import torch
import torchvision
from torch import nn

from cxrlib.models.classifiers import (
    ARCHITECTURES,
    GREY_MEAN,
    GREY_STD,
    Classifier,
    PretrainedWeightsWarning,
    adapt_first_conv,
    build_classifier,
    cam_target_layer,
    feature_layer,
    imagenet_weights_file,
    penultimate_features,
)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def empty_hub(tmp_path, monkeypatch):
    """An empty torch hub folder; any download attempt fails the test."""
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))

    def no_download(*args, **kwargs):
        raise AssertionError("a download was attempted")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_download)
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", no_download)
    return tmp_path / "hub"


def _first_conv(model: Classifier) -> nn.Conv2d:
    return next(m for m in model.backbone.modules() if isinstance(m, nn.Conv2d))


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_every_arch_takes_one_channel_and_gives_class_logits(arch):
    torch.manual_seed(0)
    model = build_classifier(arch, num_classes=3).eval()
    assert isinstance(model, Classifier) and model.arch == arch
    assert _first_conv(model).in_channels == 1
    images = torch.rand(2, 1, 64, 64)
    logits = model(images)
    assert logits.shape == (2, 3) and logits.dtype == torch.float32 and torch.isfinite(logits).all()

    features = penultimate_features(model, images)
    assert features.shape == (2, ARCHITECTURES[arch].feature_dim)
    # The features are what the head sees, and what a hook on feature_layer captures.
    assert torch.allclose(model.head(features), logits, atol=1e-5)
    captured = {}
    handles = [feature_layer(model, arch).register_forward_hook(lambda m, i, o: captured.update(gap=o)),
               cam_target_layer(model, arch).register_forward_hook(lambda m, i, o: captured.update(cam=o))]
    with torch.no_grad():
        model(images)
    for handle in handles:
        handle.remove()
    assert torch.allclose(captured["gap"], features, atol=1e-6)
    assert captured["cam"].ndim == 4 and captured["cam"].shape[0] == 2  # a spatial map for Grad-CAM


def test_vgg16_keeps_working_at_32_pixels():
    model = build_classifier("vgg16", num_classes=2).eval()
    assert model(torch.rand(1, 1, 32, 32)).shape == (1, 2)


def test_model_standardises_its_zero_one_input():
    model = build_classifier("small_cnn", num_classes=2, dropout=0.5).eval()
    images = torch.rand(3, 1, 32, 32)
    expected = model.head(model.pool(model.backbone((images - GREY_MEAN) / GREY_STD)))
    assert torch.allclose(model(images), expected)
    assert "input_mean" not in model.state_dict()  # constants, not weights


def test_imagenet_weights_missing_offline_warn_once_and_fall_back(empty_hub):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = build_classifier("resnet18", num_classes=2, weights="imagenet")
    ours = [w for w in caught if issubclass(w.category, PretrainedWeightsWarning)]
    assert len(ours) == 1
    message = str(ours[0].message)
    assert str(empty_hub / "checkpoints" / "resnet18-f37072fd.pth") in message
    assert "https://download.pytorch.org/models/resnet18-f37072fd.pth" in message
    assert _first_conv(model).in_channels == 1 and model(torch.rand(1, 1, 64, 64)).shape == (1, 2)


def test_imagenet_weights_in_the_hub_cache_are_used_with_rgb_summed(empty_hub):
    torch.manual_seed(1)
    reference = torchvision.models.resnet18()
    path = imagenet_weights_file("resnet18")
    assert path.parent == empty_hub / "checkpoints"
    path.parent.mkdir(parents=True)
    torch.save(reference.state_dict(), path)
    with warnings.catch_warnings():
        warnings.simplefilter("error", PretrainedWeightsWarning)
        model = build_classifier("resnet18", num_classes=2, weights="imagenet")
    assert torch.equal(model.backbone.conv1.weight, reference.conv1.weight.sum(dim=1, keepdim=True))
    assert torch.equal(model.backbone.layer4[1].conv2.weight, reference.layer4[1].conv2.weight)
    assert torch.equal(model.backbone.layer4[1].bn2.running_var, reference.layer4[1].bn2.running_var)
    assert model.head.fc.out_features == 2


@pytest.mark.parametrize("arch", ["resnet18", "densenet121", "vgg16", "squeezenet1_1"])
def test_a_local_torchvision_checkpoint_is_loaded(arch, tmp_path):
    torch.manual_seed(2)
    if arch == "vgg16":
        # torchvision's VGG16 minus its 120M-parameter head (slow to initialise); a small
        # stand-in head keeps the file layout, and head weights are ignored when loading.
        reference = ARCHITECTURES["vgg16"].build_source()
        reference.classifier = nn.Sequential(nn.Linear(4, 2))
    else:
        reference = torchvision.models.get_model(arch)
    state = reference.state_dict()
    if arch == "densenet121":
        # The ImageNet DenseNet files use the old layer names 'norm.1', 'conv.2', ...
        state = {re.sub(r"(denselayer\d+\.(?:norm|conv))([12])\.", r"\1.\2.", key): value
                 for key, value in state.items()}
        assert any(".norm.1." in key for key in state)
    path = tmp_path / f"{arch}.pth"
    torch.save(state, path)
    model = build_classifier(arch, num_classes=2, weights=path)
    first_name = ARCHITECTURES[arch].first_conv
    expected = reference.get_submodule(first_name).weight.sum(dim=1, keepdim=True)
    assert torch.equal(_first_conv(model).weight, expected)
    deep = {"resnet18": ("layer3.0.conv1.weight", "backbone.layer3.0.conv1.weight"),
            "densenet121": ("features.denseblock4.denselayer16.conv2.weight",
                            "backbone.denseblock4.denselayer16.conv2.weight"),
            "vgg16": ("features.28.weight", "backbone.28.weight"),
            "squeezenet1_1": ("features.12.expand3x3.weight", "backbone.12.expand3x3.weight")}[arch]
    assert torch.equal(model.state_dict()[deep[1]], reference.state_dict()[deep[0]])


def test_a_classifier_state_dict_reloads_and_a_new_head_is_fresh(tmp_path):
    torch.manual_seed(3)
    trained = build_classifier("resnet18", num_classes=2)
    path = tmp_path / "classifier.pt"
    torch.save({"model": trained.state_dict(), "epoch": 3}, path)  # a cxrlib checkpoint layout
    same = build_classifier("resnet18", num_classes=2, weights=path)
    for name, value in trained.state_dict().items():
        assert torch.equal(same.state_dict()[name], value), name
    from_memory = build_classifier("resnet18", num_classes=2, weights=trained.state_dict())
    assert torch.equal(from_memory.head.fc.weight, trained.head.fc.weight)
    other = build_classifier("resnet18", num_classes=3, weights=path)  # fine-tune on another task
    assert torch.equal(other.backbone.layer4[0].conv1.weight, trained.backbone.layer4[0].conv1.weight)
    assert other.head.fc.out_features == 3


def test_weight_errors_are_explicit(tmp_path):
    with pytest.raises(ValueError, match="no ImageNet weights"):
        build_classifier("small_cnn", 2, weights="imagenet")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        build_classifier("resnet18", 2, weights=tmp_path / "missing.pth")
    path = tmp_path / "squeeze.pth"
    torch.save(torchvision.models.squeezenet1_1().state_dict(), path)
    with pytest.raises(ValueError, match="does not fit torchvision resnet18"):
        build_classifier("resnet18", 2, weights=path)
    with pytest.raises(ValueError, match="unknown arch"):
        build_classifier("alexnet", 2)


def test_adapt_first_conv_keeps_the_response_to_a_grey_image():
    torch.manual_seed(4)
    rgb = nn.Conv2d(3, 8, 3, padding=1)
    grey = adapt_first_conv(rgb, 1)
    image = torch.rand(1, 1, 9, 9)
    assert torch.allclose(grey(image), rgb(image.repeat(1, 3, 1, 1)), atol=1e-5)
    two = adapt_first_conv(rgb, 2)
    assert two.weight.shape == (8, 2, 3, 3)
