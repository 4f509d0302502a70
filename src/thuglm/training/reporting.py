"""What a finished run leaves for people: loss.png and metrics.json."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

PAIR_METRICS = ("rewards/accuracies", "rewards/margins")
"""Preference tuning's (`task: dpo`) metrics drawn beside the loss, train and eval."""


def loss_curves(log_history: Sequence[dict[str, Any]]) -> tuple[list[tuple[int, float]], list[tuple[int, float]]]:
    """(step, loss) points of training and evaluation from the Trainer's `state.log_history`."""
    return metric_curves(log_history, "loss")


def metric_curves(log_history: Sequence[dict[str, Any]], name: str) -> tuple[list[tuple[int, float]], ...]:
    """(step, value) points of a logged metric in training logs (`name`) and in evaluations (`eval_{name}`)."""
    train = [(entry["step"], entry[name]) for entry in log_history if name in entry and "step" in entry]
    evaluation = [(entry["step"], entry[f"eval_{name}"]) for entry in log_history
                  if f"eval_{name}" in entry and "step" in entry]
    return train, evaluation


def plot_losses(log_history: Sequence[dict[str, Any]], out_file: str | Path, title: str = "") -> Path | None:
    """Draw the train and eval loss curves, and beside them a preference run's reward accuracy and margin; None
    when nothing was logged yet."""
    train, evaluation = loss_curves(log_history)
    if not train and not evaluation:
        return None
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on servers
    import matplotlib.pyplot as plt

    pairs = {name: metric_curves(log_history, name) for name in PAIR_METRICS}
    pairs = {name: curves for name, curves in pairs.items() if any(curves)}
    figure, panels = plt.subplots(1, 2 if pairs else 1, figsize=(12 if pairs else 7, 4), dpi=120, squeeze=False)
    axes = panels[0][0]
    if train:
        axes.plot(*zip(*train), label="train", color="tab:blue")
    if evaluation:
        axes.plot(*zip(*evaluation), label="eval", color="tab:orange", marker="o")
    axes.set_xlabel("optimizer step")
    axes.set_ylabel("loss (a pair)" if pairs else "loss (nats per token)")
    axes.set_title(title)
    axes.grid(alpha=0.3)
    axes.legend()
    if pairs:
        side = panels[0][1]
        for (name, (train_points, eval_points)), style in zip(pairs.items(), ("-", "--")):
            if train_points:
                side.plot(*zip(*train_points), style, label=name, color="tab:blue")
            if eval_points:
                side.plot(*zip(*eval_points), style, label=f"eval_{name}", color="tab:orange", marker="o")
        side.set_xlabel("optimizer step")
        side.set_title("rewards (chosen over rejected)")
        side.grid(alpha=0.3)
        side.legend()
    figure.tight_layout()
    out_file = Path(out_file)
    figure.savefig(out_file)
    plt.close(figure)
    return out_file


def write_json(data: dict[str, Any], out_file: str | Path) -> Path:
    out_file = Path(out_file)
    out_file.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return out_file
