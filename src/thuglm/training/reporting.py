"""What a finished run leaves for people: loss.png and metrics.json."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any


def loss_curves(log_history: Sequence[dict[str, Any]]) -> tuple[list[tuple[int, float]], list[tuple[int, float]]]:
    """(step, loss) points of training and evaluation from the Trainer's `state.log_history`."""
    train = [(entry["step"], entry["loss"]) for entry in log_history if "loss" in entry and "step" in entry]
    evaluation = [(entry["step"], entry["eval_loss"]) for entry in log_history if "eval_loss" in entry]
    return train, evaluation


def plot_losses(log_history: Sequence[dict[str, Any]], out_file: str | Path, title: str = "") -> Path | None:
    """Draw the train and eval loss curves; None when nothing was logged yet."""
    train, evaluation = loss_curves(log_history)
    if not train and not evaluation:
        return None
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on servers
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 4), dpi=120)
    if train:
        axes.plot(*zip(*train), label="train", color="tab:blue")
    if evaluation:
        axes.plot(*zip(*evaluation), label="eval", color="tab:orange", marker="o")
    axes.set_xlabel("optimizer step")
    axes.set_ylabel("loss (nats per token)")
    axes.set_title(title)
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    out_file = Path(out_file)
    figure.savefig(out_file)
    plt.close(figure)
    return out_file


def write_json(data: dict[str, Any], out_file: str | Path) -> Path:
    out_file = Path(out_file)
    out_file.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return out_file
