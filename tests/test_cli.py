"""The command lines are built from the settings' fields, one way, and give back the settings they describe."""

from __future__ import annotations

import argparse
import dataclasses

import pytest

from pipeline.brats import LOSS_OUTPUT
from pipeline.cache import PreprocessConfig
from pipeline.config import add_settings, settings_from_args
from pipeline.model import PRESETS
from preprocess.__main__ import build_parser as preprocess_parser
from train.augment import LEVELS
from train.cli import build_parser as train_parser
from train.config import TrainConfig
from train.predict import build_parser as predict_parser
from train.predictor import PredictConfig


@pytest.mark.parametrize("cls", [TrainConfig, PredictConfig, PreprocessConfig])
def test_every_setting_says_what_it_does(cls: type) -> None:
    for f in dataclasses.fields(cls):
        assert len(f.metadata.get("help", "")) > 8, (cls.__name__, f.name)


def test_the_choices_are_their_owners_lists() -> None:
    choices = {f.name: f.metadata.get("choices") for f in dataclasses.fields(TrainConfig)}
    assert tuple(choices["augment"]) == tuple(LEVELS) and tuple(choices["preset"]) == tuple(PRESETS)
    assert tuple(choices["loss_mode"]) == tuple(LOSS_OUTPUT)


@pytest.mark.parametrize(("parser", "cls", "argv", "given"), [
    (train_parser, TrainConfig, ["--cache-dir", "c", "--run-dir", "r"], {}),
    (predict_parser, PredictConfig, ["--run", "r", "--input", "i", "--output", "o"], {}),
    (preprocess_parser, PreprocessConfig, ["raw"], {}),
])
def test_no_flags_give_the_defaults(parser, cls, argv, given) -> None:  # type: ignore[no-untyped-def]
    args = parser().parse_args(argv)
    built = settings_from_args(cls, args, **given)
    defaults = cls(**{f.name: getattr(built, f.name) for f in dataclasses.fields(cls)
                      if f.default is dataclasses.MISSING})
    assert built == defaults


def test_flags_reach_their_fields() -> None:
    args = train_parser().parse_args(["--cache-dir", "c", "--run-dir", "r", "--patch-size", "32", "32", "16",
                                      "--compile", "false", "--sync-bn", "true", "--fold", "all", "--lr", "0.01",
                                      "--region-weights", "1", "2", "2.5"])
    cfg = settings_from_args(TrainConfig, args)
    assert (cfg.patch_size, cfg.compile, cfg.sync_bn, cfg.fold, cfg.lr) == ((32, 32, 16), False, True, "all", 0.01)
    assert cfg.region_weights == (1.0, 2.0, 2.5)
    cfg = settings_from_args(PredictConfig, predict_parser().parse_args(
        ["--run", "r", "--input", "i", "--output", "o", "--no-mirror", "--no-postprocessing", "--et-threshold",
         "0", "--save-probabilities"]))
    assert (cfg.mirror, cfg.postprocess, cfg.et_threshold, cfg.save_probabilities) == (False, False, 0, True)
    cfg = settings_from_args(PreprocessConfig, preprocess_parser().parse_args(["raw", "--max-indices", "0",
                                                                               "--codec", "none"]))
    assert cfg.max_indices_per_class is None and cfg.codec == "none"  # 0 on the command line: keep all


def test_a_choice_outside_the_list_is_refused(capsys) -> None:  # type: ignore[no-untyped-def]
    parser = argparse.ArgumentParser()
    add_settings(parser, TrainConfig)
    with pytest.raises(SystemExit):
        parser.parse_args(["--cache-dir", "c", "--run-dir", "r", "--augment", "heavy"])
    assert "invalid choice: 'heavy'" in capsys.readouterr().err
