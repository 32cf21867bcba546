"""The rerank job and its stages: query log -> carry-over -> retrieve -> score (pair cache) -> sink -> one commit to rankings."""
