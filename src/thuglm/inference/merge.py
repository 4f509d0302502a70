"""Fold a LoRA adapter into its base model and save a standalone model folder.

The merged folder loads with plain `AutoModelForCausalLM.from_pretrained(out_dir)` (after `import thuglm`), needs
neither peft nor the base folder, and runs as fast as the base model (no adapter matmuls).
"""

from __future__ import annotations

import shutil
import uuid
from pathlib import Path

from ..files import give_files_the_folder_mode
from ..models.prefix import is_ptuning_folder
from .loading import ModelLoadError, check_adapter_folder, load_for_inference


def check_out_dir(
    out_dir: Path, sources: list[Path], overwrite: bool, how_to_overwrite: str = "overwrite=True"
) -> None:
    """Refuse to replace a folder with content unless asked to, and never replace the model being merged.

    `how_to_overwrite` is what the caller's user writes to ask for the replacement: `overwrite=True` in Python,
    `--overwrite` on the command line.
    """
    resolved = out_dir.resolve()
    for source in sources:
        source = source.resolve()
        if resolved == source or resolved in source.parents:
            raise ModelLoadError(
                f"the output folder {out_dir} would replace {source}, which the merge reads: pick another folder"
            )
    if out_dir.exists() and not out_dir.is_dir():
        raise ModelLoadError(f"the output folder {out_dir} is a file: pass a folder")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not overwrite:
        raise ModelLoadError(f"{out_dir} is not empty: pass another folder, or {how_to_overwrite} to replace it")


def make_staging_folder(out_dir: Path) -> Path:
    """A new empty hidden folder beside `out_dir`, whose mode follows the umask as any folder's does.

    `tempfile.mkdtemp` would make it 0700 whatever the umask, and the rename keeps that mode: other users and
    services could not read the merged model. A random name makes a clash with another merge practically
    impossible; `mkdir` refuses to reuse an existing folder rather than mixing two merges.
    """
    staging = out_dir.parent / f".{out_dir.name}.{uuid.uuid4().hex[:12]}.partial"
    staging.mkdir()
    return staging


def merge_adapter(
    base: str | Path | None,
    adapter: str | Path,
    out_dir: str | Path,
    dtype: str = "fp32",
    overwrite: bool = False,
    how_to_overwrite: str = "overwrite=True",
    how_to_name_base: str | None = "base=BASE_DIR",
) -> Path:
    """Merge `adapter` into `base` and save model (safetensors) and tokenizer to `out_dir`; returns `out_dir`.

    `base` None takes the base folder recorded in the adapter's adapter_config.json. The model is written to a
    temporary sibling of `out_dir` and renamed at the end, so a failure (disk full, interrupt) never leaves a
    half-written model where a complete one is expected. `how_to_overwrite` and `how_to_name_base` are how the
    caller's user sets `overwrite` and `base`, for the messages that ask for them (the CLI passes its flags).
    """
    adapter, out_dir = Path(adapter), Path(out_dir)
    sources = [adapter] if base is None else [Path(base), adapter]
    check_adapter_folder(adapter)
    if is_ptuning_folder(adapter):
        raise ModelLoadError(f"{adapter} is a P-Tuning v2 prefix: it adds keys and values in front of the text, not a "
                             "change of the base's weights, so there is nothing to merge. Use it as it is: "
                             f"`thuglm chat BASE_DIR --adapter {adapter}`.")
    check_out_dir(out_dir, sources, overwrite, how_to_overwrite)
    if base is None:
        tokenizer, model = load_for_inference(adapter, dtype=dtype, device="cpu", how_to_name_base=how_to_name_base)
    else:
        tokenizer, model = load_for_inference(base, adapter=adapter, dtype=dtype, device="cpu")
    if not hasattr(model, "merge_and_unload"):
        raise ModelLoadError(f"the adapter in {adapter} ({model.peft_config['default'].peft_type}) cannot be merged")
    merged = model.merge_and_unload()
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = make_staging_folder(out_dir)
    try:
        merged.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        give_files_the_folder_mode(staging)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        staging.rename(out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out_dir
