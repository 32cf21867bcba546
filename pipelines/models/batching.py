"""Token-budget batching, with tokenisation one step ahead of the model.

A model's cost is the padded tokens it reads (rows x longest row), so a fixed row count per batch is wrong both
ways: long texts make big, slow batches, short ones leave the device idle. ``BatchRunner`` instead:

1. sorts everything it is given by length (characters: free), longest first, so that neighbours pad little;
2. in a producer thread, counts each chunk's real token lengths, cuts it into batches of at most
   ``token_budget`` padded tokens (and ``max_rows`` rows: 64 on a CPU), and prepares each batch's model inputs;
3. runs the model on batch i while the producer prepares batch i+1 (a bounded queue: the model never waits
   for the tokenizer, and memory stays at a couple of batches);
4. returns the rows in the caller's order.

The model-specific parts are three callables: ``lengths(items)`` (token counts), ``prepare(items)`` (model
inputs, e.g. ``SentenceTransformer.preprocess``) and ``forward(inputs)`` (a numpy array, one row per item), so
the same runner serves the torch and ONNX backends, bi-encoders and cross-encoders. Where the caller owns the
tokenizer call (the ONNX and OpenVINO backends), ``tokenize(items)`` replaces ``lengths``: each text is tokenised
once, and ``prepare`` pads a batch's token ids (``pad_batch``).

Example::

    runner = BatchRunner(lengths=count_tokens, prepare=model.preprocess, forward=run_model, token_budget=4096)
    vectors = runner.run(texts)
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

# Padded tokens per batch. CPU: best of 1k-16k on 2 cores with all-MiniLM-L6-v2, long and short texts;
# small batches stay in cache. GPU: large enough to fill the device, with room for attention activations.
CPU_TOKENS = 4096
GPU_TOKENS = 65536
MAX_ROWS = 1024
CPU_MAX_ROWS = 64
CHUNK = 1024  # rows whose lengths are counted together (one tokenizer call)


def default_budget(device: str) -> int:
    return GPU_TOKENS if str(device).startswith("cuda") else CPU_TOKENS


def default_max_rows(device: str) -> int:
    """Rows per batch at most: on a CPU, batches of short texts over 64 rows ran slower at the same padded tokens
    (activations out of cache: MiniLM on MS MARCO queries, 1 thread, 383 texts/s at 32-64 rows, 316 at 1,024)."""
    return MAX_ROWS if str(device).startswith("cuda") else CPU_MAX_ROWS


def plan(lengths: np.ndarray, token_budget: int, max_rows: int = MAX_ROWS) -> list[np.ndarray]:
    """Batches (index arrays, longest first) of at most ``token_budget`` padded tokens and ``max_rows`` rows;
    a single row longer than the budget is a batch of its own."""
    order = np.argsort(-np.asarray(lengths), kind="stable")
    batches, start, n = [], 0, len(order)
    while start < n:
        longest = max(int(lengths[order[start]]), 1)
        rows = max(1, min(max_rows, token_budget // longest))
        batches.append(order[start:start + rows])
        start += rows
    return batches


def char_length(item: Any) -> int:
    if isinstance(item, str):
        return len(item)
    return sum(len(x) for x in item)


class BatchRunner:
    """Runs a model over many items in token-budget batches; see the module docstring."""

    def __init__(self, *, lengths: Callable[[list], Sequence[int]] | None = None, prepare: Callable[[list], Any],
                 forward: Callable[[Any], np.ndarray], token_budget: int, max_rows: int = MAX_ROWS,
                 chunk: int = CHUNK, tokenize: Callable[[list], tuple[Sequence[int], list]] | None = None):
        """``tokenize`` (instead of ``lengths``): each chunk tokenised once, ``(lengths, tokenised items)``, and
        ``prepare`` then gets a batch's tokenised items (to pad), not its texts: no text is tokenised twice."""
        if token_budget <= 0:
            raise ValueError(f"token_budget must be > 0 (got {token_budget})")
        if (lengths is None) == (tokenize is None):
            raise ValueError("give lengths (texts to prepare) or tokenize (tokenised items to prepare), one of them")
        self.lengths, self.prepare, self.forward, self.tokenize = lengths, prepare, forward, tokenize
        self.token_budget, self.max_rows, self.chunk = token_budget, max_rows, chunk
        self.batches = self.padded_tokens = self.tokens = 0  # counters, for reports and benchmarks

    def run(self, items: Sequence) -> np.ndarray | None:
        """One output row per item, in the order given (None when ``items`` is empty)."""
        if len(items) == 0:
            return None
        order = np.argsort(-np.fromiter((char_length(x) for x in items), np.int64, len(items)), kind="stable")
        ready: queue.Queue = queue.Queue(maxsize=2)
        stop = threading.Event()
        producer = threading.Thread(target=self._produce, args=(items, order, ready, stop),
                                    name="batchrank-tokenize", daemon=True)
        producer.start()
        out = None
        try:
            while True:
                got = ready.get()
                if got is None:
                    break
                if isinstance(got, BaseException):
                    raise got
                idx, inputs = got
                rows = np.asarray(self.forward(inputs))
                if out is None:
                    out = np.empty((len(items), *rows.shape[1:]), dtype=rows.dtype)
                out[idx] = rows
        finally:
            stop.set()
            while producer.is_alive():  # unblock a producer waiting on a full queue
                try:
                    ready.get_nowait()
                except queue.Empty:
                    producer.join(0.05)
        return out

    def _produce(self, items, order: np.ndarray, ready: queue.Queue, stop: threading.Event) -> None:
        try:
            for start in range(0, len(order), self.chunk):
                part = order[start:start + self.chunk]
                texts = [items[i] for i in part]
                if self.tokenize is not None:
                    counts, texts = self.tokenize(texts)  # the chunk's tokens, kept for its batches
                else:
                    counts = self.lengths(texts)
                lengths = np.asarray(counts, dtype=np.int64)
                for b in plan(lengths, self.token_budget, self.max_rows):
                    if stop.is_set():
                        return
                    self.batches += 1
                    self.tokens += int(lengths[b].sum())
                    self.padded_tokens += int(lengths[b].max()) * len(b)
                    ready.put((part[b], self.prepare([texts[j] for j in b])))
            ready.put(None)
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer, which raises it
            ready.put(exc)


def encode_output(runner: BatchRunner, texts, dim: int, convert_to_tensor: bool = False):
    """What an ``encode`` returns for ``texts``: one float32 row each ((0, dim) for none), as a torch tensor when
    asked (numpy otherwise)."""
    out = runner.run(list(texts))
    if out is None:
        out = np.zeros((0, dim), np.float32)
    if convert_to_tensor:
        import torch

        return torch.from_numpy(out)
    return out


def pad_batch(rows: list[dict[str, list[int]]], pad_id: int, left: bool = False) -> dict[str, np.ndarray]:
    """Token ids of one batch (one dict of lists per row: ``input_ids``, and ``token_type_ids`` when the model reads
    them) padded to its longest row as int64 arrays, with the ``attention_mask``: what the tokenizer's own
    ``padding=True`` gives, without tokenising the texts again."""
    width = max(len(r["input_ids"]) for r in rows)
    names = [n for n in rows[0] if n != "attention_mask"]
    out = {n: np.full((len(rows), width), pad_id if n == "input_ids" else 0, np.int64) for n in names}
    out["attention_mask"] = np.zeros((len(rows), width), np.int64)
    for k, row in enumerate(rows):
        n = len(row["input_ids"])
        cols = slice(width - n, width) if left else slice(0, n)
        for name in names:
            out[name][k, cols] = row[name]
        out["attention_mask"][k, cols] = 1
    return out


def token_counter(tokenizer, max_length: int | None, pairs: bool = False) -> Callable[[list], list[int]]:
    """Token counts (special tokens included, truncated at ``max_length``) with a Hugging Face tokenizer."""

    def count(items: list) -> list[int]:
        kwargs = dict(truncation=max_length is not None, max_length=max_length, return_length=True,
                      return_attention_mask=False, return_token_type_ids=False)
        if pairs:
            return tokenizer([a for a, _ in items], [b for _, b in items], **kwargs)["length"]
        return tokenizer(list(items), **kwargs)["length"]

    return count


def cpu_supports_bf16() -> bool:
    """AMX (or AVX-512 BF16) on this CPU, where torch's bf16 matmuls run at several times fp32 speed."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as fh:
            for line in fh:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return "amx_bf16" in flags or "avx512_bf16" in flags
    except OSError:
        pass
    return False
