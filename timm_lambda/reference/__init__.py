"""The reference model shipped in the package: a 12-block ViT trained on Fashion-MNIST.

`scripts/train_reference.py` trained it; `training.json` beside the weights records the recipe,
the budget and its test top-1. `timm.create_model(REFERENCE_MODEL, pretrained=True)` loads it.
"""
import json
from pathlib import Path
from typing import Any, Dict

__all__ = ['REFERENCE_DIR', 'REFERENCE_MODEL', 'reference_training']

REFERENCE_DIR = Path(__file__).resolve().parent
REFERENCE_MODEL = f'local-dir:{REFERENCE_DIR}'


def reference_training() -> Dict[str, Any]:
    """The recipe, budget (images seen, seconds) and test top-1 of the reference model."""
    return json.loads((REFERENCE_DIR / 'training.json').read_text())
