import argparse
import json
import subprocess
import sys

import pytest
from transformers import AutoModelForCausalLM

from thuglm.cli import build_parser, main


def run_cli(*args, stdin=""):
    return subprocess.run(
        [sys.executable, "-m", "thuglm", *args], input=stdin, capture_output=True, text=True, timeout=300, check=False
    )


def test_tiny_builds_a_loadable_model(tmp_path):
    result = run_cli("tiny", str(tmp_path / "tiny"))
    assert result.returncode == 0, result.stderr
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "tiny")
    assert model.config.model_type == "chatglm" and model.config.num_layers == 2
    assert (tmp_path / "tiny" / "ice_text.model").is_file()


def test_chat_answers_clears_and_exits(tiny_dir):
    result = run_cli("chat", str(tiny_dir), "--greedy", "--max-new-tokens", "16", stdin="你好\n/clear\n春天\n/exit\n")
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("ChatGLM：") == 2
    assert "(history cleared)" in result.stdout


def test_chat_on_a_folder_without_a_model_says_what_to_do(tmp_path):
    result = run_cli("chat", str(tmp_path))
    assert result.returncode != 0
    assert "no config.json" in result.stderr and "thuglm tiny" in result.stderr
    assert "Traceback" not in result.stderr


def test_demo_pretrains_tunes_and_chats(tmp_path, monkeypatch):
    """The README's main command, as it is: both training stages, falling losses, a chat answer."""
    monkeypatch.setenv("THUGLM_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf"))
    result = run_cli("demo", "--out", str(tmp_path / "demo"), "--max-new-tokens", "16")
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("ChatGLM：") == 2
    # LoRA starts near where the pretrained characters leave it (~6.1) and falls ~0.2 in its minute
    for stage, drop in (("pretrain", 1.5), ("lora", 0.15)):
        metrics = json.loads((tmp_path / "demo" / stage / "metrics.json").read_text())
        state = json.loads((tmp_path / "demo" / stage / "trainer_state.json").read_text())
        losses = [entry["loss"] for entry in state["log_history"] if "loss" in entry]
        assert losses[-1] < losses[0] - drop, (stage, losses)
        assert metrics["eval_loss"] is not None and (tmp_path / "demo" / stage / "loss.png").is_file()
    assert (tmp_path / "demo" / "lora" / "adapter_model.safetensors").is_file()


def test_merge_of_a_folder_without_an_adapter_exits_2_with_a_message(tiny_dir, tmp_path):
    result = run_cli("merge", "--base", str(tiny_dir), "--adapter", str(tmp_path), "--out", str(tmp_path / "merged"))
    assert result.returncode == 2
    assert result.stderr.startswith("thuglm: ") and "no adapter_config.json" in result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "merged").exists()


def subcommand_parsers():
    """{name: parser} of every `thuglm` subcommand (argparse keeps them on its subparsers action only)."""
    action = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return action.choices


def test_every_option_of_every_subcommand_has_help_and_shows_its_default(capsys):
    for name, parser in subcommand_parsers().items():
        with pytest.raises(SystemExit):
            main([name, "--help"])
        shown = " ".join(capsys.readouterr().out.split())  # argparse wraps lines anywhere
        for action in parser._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            label = f"{name} {'/'.join(action.option_strings) or action.dest}"
            assert action.help, f"{label} has no help text"
            if action.default not in (None, False):
                assert f"(default: {action.default})" in shown, f"{label}: --help does not show {action.default!r}"
    serve, demo = subcommand_parsers()["serve"], subcommand_parsers()["demo"]
    assert "--port PORT the TCP port to listen on (default: 8000)" in " ".join(serve.format_help().split())
    assert "answer tokens at most (default: 48)" in " ".join(demo.format_help().split())  # demo's own default


def test_bitsandbytes_notice_of_an_optional_cpu_kernel_is_dropped_and_its_other_messages_kept(caplog):
    import logging

    from thuglm.cli import quiet_optional_kernel_notice

    quiet_optional_kernel_notice()
    logger = logging.getLogger("bitsandbytes.backends.cpu.ops")
    with caplog.at_level(logging.WARNING, logger=logger.name):
        logger.warning("Failed to load CPU gemm_4bit_forward from kernels-community: No module named 'kernels'.")
        logger.warning("another bitsandbytes warning")
    assert [record.getMessage() for record in caplog.records] == ["another bitsandbytes warning"]
