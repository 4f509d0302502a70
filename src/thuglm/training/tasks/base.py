"""What a training task gives the recipe: its datasets, model, batches, metrics, trainer and saved extras.

`thuglm train` runs one fixed sequence (training/recipe.py); the task decides what each step means. A task is a class
registered under the name `task:` takes in the config; the recipe makes one instance a run (`Task(config)`), so what
one step learns (the label set found in the data, say) is there for the next.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from peft import TaskType

if TYPE_CHECKING:
    from datasets import Dataset
    from transformers import Trainer

    from ..config import TrainConfig


class Task:
    """A training task; subclasses are registered with `register_task` (training/tasks/__init__.py)."""

    name: ClassVar[str]
    peft_task_type: ClassVar[TaskType]
    # A module the task adds to the base (a classification head): trained whole beside a LoRA adapter and saved with
    # it (peft's modules_to_save), trainable under `method: freeze` too. None: the task trains the base's own modules.
    head: ClassVar[str | None] = None
    # Whether `eval_loss` is a mean over tokens, so that exp(eval_loss) is a perplexity worth reporting.
    reports_perplexity: ClassVar[bool] = True
    # Whether P-Tuning's prefix alone can learn it (a new head cannot be learned by a prefix).
    trains_with_prefix: ClassVar[bool] = True

    def __init__(self, config: TrainConfig):
        self.config = config

    @classmethod
    def check_config(cls, config: TrainConfig) -> None:
        """Refuse settings the task cannot honour (ConfigError, with the fix); called when the config is loaded."""

    def build_datasets(self, tokenizer) -> tuple[Dataset, Dataset | None]:
        """The training rows and the evaluation rows (None: no evaluation), ready for `collator`."""
        raise NotImplementedError

    def load_model(self, model_dir: Path, dtype: torch.dtype, attn_implementation: str, **load_kwargs) -> torch.nn.Module:
        """The model to train, before the method (LoRA, freeze, ...) is applied. `load_kwargs`: more `from_pretrained`
        arguments (a 4-/8-bit base)."""
        from ..methods import load_base_model

        return load_base_model(model_dir, dtype, attn_implementation, **load_kwargs)

    def collator(self, tokenizer, model: torch.nn.Module) -> Callable:
        """The Trainer's `data_collator`."""
        raise NotImplementedError

    def compute_metrics(self) -> Callable | None:
        """The Trainer's `compute_metrics` (None: the evaluation loss alone)."""
        return None

    def make_trainer(self, **trainer_kwargs: Any) -> Trainer:
        """The Trainer that runs the task, from the recipe's arguments (model, args, datasets, collator, ...)."""
        from ..trainer import GlmTrainer

        return GlmTrainer(**trainer_kwargs)

    def save_beside_model(self, model: torch.nn.Module, output_dir: Path) -> None:
        """Files the output folder needs besides what the Trainer saved (main process only)."""

    def final_metrics(self, metrics: dict[str, Any], log_history: list[dict]) -> dict[str, Any]:
        """metrics.json from the run's common metrics and the Trainer's log."""
        if not self.reports_perplexity:
            metrics = {key: value for key, value in metrics.items() if key != "perplexity"}
        return metrics


def split_off_evaluation(rows: Dataset, config: TrainConfig) -> tuple[Dataset, Dataset | None]:
    """`data.validation_split` of `rows` held out for evaluation, unless `data.eval_files` gives the evaluation rows."""
    data = config.data
    if not data.validation_split or data.eval_files:
        return rows, None
    split = rows.train_test_split(test_size=data.validation_split, seed=config.seed)
    return split["train"], split["test"]
