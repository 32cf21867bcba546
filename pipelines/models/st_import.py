"""sentence-transformers imported without scikit-learn on the start-up path.

``import sentence_transformers`` runs ``from sklearn.metrics import pairwise_distances`` (in
``sentence_transformers/util/similarity.py``, for the Manhattan and Euclidean similarity functions), and
scikit-learn with SciPy under it is ~1.2 s of the ~5 s import (2.2 s of 8 s on a loaded 2-core machine): every
embedding and scoring actor paid it before its first row, and batchrank never calls those functions. Here, while
sentence-transformers is being imported and only if scikit-learn is not loaded yet, ``sklearn.metrics`` is a
stand-in whose ``pairwise_distances`` imports the real scikit-learn when first called; any other name asked of it
imports the real module at once. The stand-in leaves ``sys.modules`` when the import ends, so a later ``import
sklearn.metrics`` (training's evaluators) gets the real one.

    from pipelines.models.st_import import sentence_transformers
    SentenceTransformer = sentence_transformers().SentenceTransformer
"""

from __future__ import annotations

import contextlib
import sys
import threading
import types

_LOCK = threading.Lock()
_STAND_IN = "sklearn.metrics"


def sentence_transformers() -> types.ModuleType:
    """The ``sentence_transformers`` module, imported (once) with scikit-learn deferred."""
    module = sys.modules.get("sentence_transformers")
    if module is not None:
        return module
    with _LOCK, _deferred_sklearn_metrics():
        import sentence_transformers as module
    return module


def _pairwise_distances(*args, **kwargs):
    """sklearn.metrics.pairwise_distances, imported on the first call."""
    from sklearn.metrics import pairwise_distances

    return pairwise_distances(*args, **kwargs)


@contextlib.contextmanager
def _deferred_sklearn_metrics():
    if "sklearn" in sys.modules or _STAND_IN in sys.modules:  # loaded already: nothing to save
        yield
        return
    stand_in = types.ModuleType(_STAND_IN, "batchrank's stand-in while sentence-transformers imports")
    stand_in.pairwise_distances = _pairwise_distances

    def real(name: str):  # any other name: the real module, now (the stand-in steps aside first)
        if name.startswith("__"):  # inspect.getmodule probes every module's __file__: not a use
            raise AttributeError(name)
        if sys.modules.get(_STAND_IN) is stand_in:
            del sys.modules[_STAND_IN]
        import importlib

        return getattr(importlib.import_module(_STAND_IN), name)

    stand_in.__getattr__ = real
    sys.modules[_STAND_IN] = stand_in
    try:
        yield
    finally:
        if sys.modules.get(_STAND_IN) is stand_in:
            del sys.modules[_STAND_IN]
