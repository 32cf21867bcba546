"""The bi-encoder on the driver, for an incremental run whose delta is too small to be worth an actor pool.

Reads top to bottom::

    Preload          started at startup: loads the model in a background thread while the corpus is compared
    local_embedder   the loaded model (waiting for the preload), or one loaded now
    driver_embedder  the Embedder built from the config, using every CPU of this process

Example::

    preload = Preload(cfg)          # the plan runs meanwhile
    embedder = local_embedder(cfg, preload)
    batch = embedder(batch)
    preload.discard()
"""

from __future__ import annotations

import os


def driver_embedder(cfg):
    """The bi-encoder in this process, for a run small enough to embed here."""
    from pipelines.index.embed import Embedder

    return Embedder.from_config(cfg, device=cfg.embed.device, num_threads=os.cpu_count())


def local_embedder(cfg, preload: Preload | None):
    """The preloaded bi-encoder (waiting for its load to finish), or one loaded now when none was preloaded."""
    return preload.get() if preload is not None else driver_embedder(cfg)


class Preload:
    """Loads the bi-encoder on the driver in a background thread, for deltas small enough to embed here."""

    def __init__(self, cfg):
        import threading

        self._cfg, self._result, self._error = cfg, None, None
        self._thread = threading.Thread(target=self._load, name="batchrank-preload", daemon=True)
        self._thread.start()

    def _load(self) -> None:
        try:
            self._result = driver_embedder(self._cfg)
        except BaseException as exc:  # surfaced by get()
            self._error = exc

    def get(self):
        self._thread.join()
        if self._error is not None:
            raise self._error
        return self._result

    def discard(self) -> None:
        """Drop the model; first let a load still under way finish: a daemon thread killed mid-import at exit
        prints torch tracebacks over a failed run's one-line error."""
        self._thread.join()
        self._result = None
