"""The README says what the code does: the config it shows, the install commands it names, the layout it lists."""

from __future__ import annotations

import argparse
import dataclasses
import re
import tomllib
from pathlib import Path

import yaml

from thuglm.cli import build_parser
from thuglm.training.config import TrainConfig

ROOT = Path(__file__).parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")
KEYS_WITHOUT_A_DEFAULT = {"model", "data.files"}


def example_config() -> dict:
    """The YAML block of the README's "Train" section."""
    return yaml.safe_load(re.search(r"^## Train\b.*?```yaml\n(.*?)```", README, re.S | re.M).group(1))


def default_of(field: dataclasses.Field):
    if field.default is not dataclasses.MISSING:
        return field.default
    return field.default_factory()


def differences_from_the_defaults(shown: dict, config_class, prefix: str = "") -> list[str]:
    fields = {field.name: field for field in dataclasses.fields(config_class)}
    differences = []
    for key, value in shown.items():
        name = prefix + key
        assert key in fields, f"the README shows {name}, which is no config key"
        default = default_of(fields[key])
        if dataclasses.is_dataclass(default):
            differences += differences_from_the_defaults(value, type(default), prefix=name + ".")
        elif name not in KEYS_WITHOUT_A_DEFAULT and value != default:
            differences.append(f"{name}: {value!r} (default {default!r})")
    return differences


def test_the_example_config_shows_the_defaults():
    # A reader copies the block: a value that is not the default (precision: bf16 on a CPU) would surprise.
    config = example_config()
    assert {"precision", "gradient_checkpointing", "save_total_limit", "data", "lora"} <= set(config)
    assert differences_from_the_defaults(config, TrainConfig) == []


def test_the_tensorboard_command_names_the_extra_that_installs_it():
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]["optional-dependencies"]
    assert any(requirement.startswith("tensorboard>=") for requirement in extras["tensorboard"])
    assert "`tensorboard --logdir output_dir/runs`" in README
    assert '`pip install -e ".[tensorboard]"`' in README


def test_the_layout_lists_every_command():
    line = next(line for line in README.splitlines() if line.strip().startswith("cli.py"))
    listed = set(re.findall(r"\w+", line.split(":", 1)[1]))
    subparsers = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    assert set(subparsers.choices) <= listed
