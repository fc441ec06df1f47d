"""Stage configs as dataclasses, one module per stage, and the machinery they share (fields.py)."""
from duch.pipeline.config.archive import AddConfig, CompactConfig, RemoveConfig
from duch.pipeline.config.encode import EncodeConfig
from duch.pipeline.config.evaluate import EvaluateConfig
from duch.pipeline.config.extract import ExtractConfig
from duch.pipeline.config.fields import manifest_config, output_settings, parse_overrides
from duch.pipeline.config.serve import ServeConfig
from duch.pipeline.config.train import PAPER_TRAINING, TRAIN_RECIPES, TrainConfig

__all__ = ["AddConfig", "CompactConfig", "EncodeConfig", "EvaluateConfig", "ExtractConfig", "RemoveConfig",
           "ServeConfig", "TrainConfig", "PAPER_TRAINING", "TRAIN_RECIPES", "manifest_config", "output_settings",
           "parse_overrides"]
