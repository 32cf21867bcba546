"""batchrank: offline two-stage ranking at corpus scale on Ray, sentence-transformers and LanceDB.

The folder tree is the flow (README "How it works" has a line per module)::

    index/      corpus files → validate → embed (actor pool) → sink → one commit to ``passages``
    rerank/     query logs → normalise, count, select → retrieve (actor pool) → score (actor pool, pair cache)
                → sink → one commit to ``rankings``
    store/      every LanceDB table: staging, commits, upkeep, search (the only package that imports lancedb)
    quality/    eval (nDCG, MRR, recall) and fine-tuning of both models on judgments
    cluster/    Ray start or join, job submission, schedules, table locks
    models/     loading either model once, on any device and backend
    beside them: registry.py (the jobs) · runs.py (the run protocol) · config/ · schema.py · report.py · files.py
    · nightly.py (index then rerank) · lookup.py · search.py · cli.py

Importing the package is cheap: torch, Ray and LanceDB load inside the stages that use them.
"""

__version__ = "0.1.0"
