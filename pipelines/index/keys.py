"""The 64-bit keys the index run's id state is keyed by: BLAKE2b of a document's id (and of its content hash).

The read tasks compute them as rows are validated (``_id_key``, ``_content_key``), ``ids.py`` when it loads what
``passages`` holds: both sides must hash alike.

Example::

    id_hash("doc-1")   # a signed 64-bit int (numpy and Arrow take it as int64)
"""

from __future__ import annotations

import hashlib


def id_hash(doc_id: str) -> int:
    """An id's 64-bit key (signed, so that numpy and Arrow take it as int64)."""
    return int.from_bytes(hashlib.blake2b(doc_id.encode("utf-8", "surrogatepass"), digest_size=8).digest(),
                          "little", signed=True)
