"""Fine-tuning ChatGLM: the config (`config`), the recipe behind `thuglm train` (`recipe`), and its reports."""

from .config import ConfigError, TrainConfig, load_config

__all__ = ["ConfigError", "TrainConfig", "load_config"]
