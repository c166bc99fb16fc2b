"""Saving and loading model folders in timm's Hugging Face format (`model.safetensors` + `config.json`)."""
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Dict, Optional

import torch
from timm.models import save_for_hf

__all__ = ['save_model_dir']


def save_model_dir(
        model: torch.nn.Module,
        output_dir: os.PathLike,
        model_config: Optional[Dict[str, Any]] = None,
        model_args: Optional[Dict[str, Any]] = None,
) -> Path:
    """Write `model.safetensors` + `config.json` with timm's `save_for_hf`, atomically.

    The files are written in a temporary sibling folder and moved into `output_dir` one by one
    with `os.replace`, so a killed run never leaves a half-written file behind.
    `timm.create_model('local-dir:OUTPUT_DIR')` re-creates the model.
    """
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=output_dir, prefix='.save-'))
    try:
        save_for_hf(model, tmp, model_config=model_config, model_args=model_args, safe_serialization=True)
        for name in ('model.safetensors', 'config.json'):
            os.replace(tmp / name, output_dir / name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return output_dir
