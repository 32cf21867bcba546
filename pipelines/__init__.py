"""batchrank: offline two-stage ranking at corpus scale on Ray, sentence-transformers and LanceDB.

Importing the package is cheap: torch, Ray and LanceDB load inside the stages that use them.
"""

__version__ = "0.1.0"
