"""Settings helpers: dataclasses from mappings, notebook parameters and command lines."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from typing import Literal

import pytest

from cxrlib.settings import add_arguments, from_arguments, from_mapping, from_params, option_name


@dataclass
class Inner:
    channels: tuple[int, ...] = (8, 16)
    name: str = "unet"


@dataclass
class Outer:
    epochs: int = field(default=10, metadata={"help": "passes over the data"})
    lr: float = 1e-3
    schedule: Literal["cosine", "step"] = "cosine"
    amp: bool = True
    classes: list[str] | None = None
    cap: int | None = None
    sizes: tuple[int, ...] = field(default=(32, 64), metadata={"aliases": ("--levels",)})
    arch: str = field(default="a", metadata={"choices": ("a", "b")})
    inner: Inner = field(default_factory=Inner)


def test_from_mapping_builds_nested_and_tuples() -> None:
    config = from_mapping(Outer, {"epochs": 3, "sizes": [1, 2], "inner": {"channels": [4, 8, 16]}})
    assert config.epochs == 3 and config.lr == 1e-3
    assert config.sizes == (1, 2) and isinstance(config.sizes, tuple)
    assert isinstance(config.inner, Inner) and config.inner.channels == (4, 8, 16)
    assert from_mapping(Outer, {}) == Outer()
    assert from_mapping(Outer, {"classes": ["x", "y"]}).classes == ["x", "y"]  # a list field stays a list


def test_from_mapping_unknown_keys() -> None:
    with pytest.raises(ValueError, match=r"unknown Outer settings: bogus, runtime"):
        from_mapping(Outer, {"epochs": 3, "runtime": {}, "bogus": 1})
    with pytest.raises(ValueError, match="unknown Inner settings: depth"):
        from_mapping(Outer, {"inner": {"depth": 3}})
    loose = from_mapping(Outer, {"epochs": 3, "runtime": {}, "inner": {"depth": 3, "name": "x"}}, strict=False)
    assert loose.epochs == 3 and loose.inner.name == "x"
    with pytest.raises(TypeError, match="dataclass"):
        from_mapping(dict, {})


def test_from_params_upper_case_and_names() -> None:
    params = {"EPOCHS": 7, "LEARNING_RATE": 0.5, "LR": 9.0, "SEED": 1, "SIZES": [3]}
    config = from_params(Outer, params, names={"lr": "LEARNING_RATE"})
    assert config.epochs == 7 and config.lr == 0.5 and config.sizes == (3,)
    assert config.schedule == "cosine"  # absent parameters keep the default
    assert from_params(Outer, {}) == Outer()


def _parser(**kwargs) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser()
    add_arguments(parser, Outer, exclude=("inner",), **kwargs)
    return parser


def test_add_arguments_defaults_types_and_help() -> None:
    parser = _parser()
    args = parser.parse_args([])
    assert from_arguments(Outer, args) == Outer()
    assert args.sizes == [32, 64]
    help_text = parser.format_help()
    assert "passes over the data" in help_text and "--no-amp" in help_text and "--max" not in help_text
    assert "--lr" in help_text and "--inner" not in help_text


def test_add_arguments_parses_every_kind() -> None:
    args = _parser().parse_args(["--epochs", "3", "--lr", "0.1", "--schedule", "step", "--no-amp",
                                 "--classes", "Normal", "COVID-19", "--cap", "5", "--levels", "1", "2", "4",
                                 "--arch", "b"])
    config = from_arguments(Outer, args, inner=Inner(name="z"))
    assert config == Outer(epochs=3, lr=0.1, schedule="step", amp=False, classes=["Normal", "COVID-19"], cap=5,
                           sizes=(1, 2, 4), arch="b", inner=Inner(name="z"))
    assert _parser().parse_args(["--amp"]).amp is True


def test_add_arguments_rejects_bad_values_and_fields() -> None:
    for argv in (["--schedule", "linear"], ["--arch", "c"], ["--epochs", "x"]):
        with pytest.raises(SystemExit):
            _parser().parse_args(argv)
    with pytest.raises(TypeError, match="Outer.inner"):
        add_arguments(argparse.ArgumentParser(), Outer)
    with pytest.raises(ValueError, match="no fields nope"):
        add_arguments(argparse.ArgumentParser(), Outer, exclude=("inner", "nope"))


def test_add_arguments_defaults_override() -> None:
    args = _parser(defaults={"epochs": 99, "sizes": (5,)}).parse_args([])
    assert args.epochs == 99 and from_arguments(Outer, args).sizes == (5,)
    assert option_name("max_steps_per_epoch") == "--max-steps-per-epoch"


def test_setting_carries_help_choices_and_aliases() -> None:
    from dataclasses import fields

    from cxrlib.settings import setting

    @dataclass
    class Knobs:
        mode: str = setting("a", "how it runs", choices=("a", "b"), aliases=("--how",))
        extra: dict = setting(factory=dict, help="free-form")

    mode, extra = fields(Knobs)
    assert mode.metadata == {"help": "how it runs", "choices": ("a", "b"), "aliases": ("--how",)}
    assert Knobs().extra == {} and Knobs().extra is not Knobs().extra
    parser = argparse.ArgumentParser()
    add_arguments(parser, Knobs, exclude=("extra",))
    assert parser.parse_args(["--how", "b"]).mode == "b"


def test_training_command_lines_keep_their_option_spellings() -> None:
    """The options the hand-written parsers had still parse, into the config fields."""
    from cxrlib.models.diffusion import DiffusionConfig
    from cxrlib.train import classifier, cyclegan, diffusion, segmentation

    args = cyclegan.build_parser().parse_args([
        "--manifest", "m.csv", "--domain-a", "normal", "--domain-b", "covid", "--run-dir", "r", "--no-hflip",
        "--no-amp", "--no-channels-last", "--no-progress", "--no-resume", "--lr", "0.001", "--lambda-id", "0.5",
        "--generator", "resnet", "--n-blocks", "6", "--max-steps-per-epoch", "3", "--sample-every", "0"])
    config = from_arguments(cyclegan.CycleGANTrainConfig, args, model={"generator": args.generator})
    assert (config.hflip, config.amp, config.channels_last, config.progress) == (False, False, False, False)
    assert (config.lr, config.lambda_id, config.max_steps_per_epoch, config.sample_every) == (0.001, 0.5, 3, 0)
    assert args.no_resume and args.n_blocks == 6 and config.model == {"generator": "resnet"}

    args = segmentation.build_parser().parse_args([
        "--manifest", "m.csv", "--run-dir", "r", "--include-heart", "--no-augment", "--depth", "3",
        "--norm", "group", "--upsample", "bilinear", "--schedule", "step"])
    config = from_arguments(segmentation.SegTrainConfig, args, unet={"depth": args.depth})
    assert config.include_heart and not config.augment and config.schedule == "step"
    assert (args.norm, args.upsample) == ("group", "bilinear")

    args = classifier.build_parser().parse_args([
        "--manifest", "m.csv", "--run-dir", "r", "--arch", "small_cnn", "--classes", "normal", "covid",
        "--patience", "0", "--input-mode", "lung_masked", "--augment", "heavy", "--imbalance", "balanced_sampler"])
    config = from_arguments(classifier.ClassifierTrainConfig, args, num_classes=2, patience=args.patience or None)
    assert config.classes == ["normal", "covid"] and config.patience is None and config.augment == "heavy"
    assert (config.arch, config.input_mode, config.imbalance) == ("small_cnn", "lung_masked", "balanced_sampler")

    args = diffusion.build_parser().parse_args([
        "m.csv", "out", "--channels", "16", "32", "--latent", "--prediction-type", "epsilon",
        "--max-steps-per-epoch", "0", "--max-train-minutes", "2", "--vae-epochs", "3"])
    model = from_arguments(DiffusionConfig, args)
    config = from_arguments(diffusion.DiffusionTrainConfig, args, model=model,
                            max_train_seconds=60 * args.max_train_minutes or None)
    assert model.block_out_channels == (16, 32) and model.latent and model.prediction_type == "epsilon"
    assert config.max_steps_per_epoch is None and config.max_train_seconds == 120 and config.vae_epochs == 3
    assert from_arguments(diffusion.DiffusionTrainConfig, diffusion.build_parser().parse_args(["m", "o"]),
                          model=DiffusionConfig()) == diffusion.DiffusionTrainConfig()
