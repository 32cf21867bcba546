"""Passages from documents: each document split by the bi-encoder's own tokenizer, so that no token goes unembedded.

Reads top to bottom::

    Chunker.from_model   the window: chunk.tokens, or what the model reads (max_seq_length less special tokens, the
                         document prompt and a small margin); the overlap: chunk.overlap, or an eighth of the window;
                         refuses a window the model cannot read or one not larger than the overlap, naming the setting
    Chunker.split        per document: its text tokenised once (offsets, no truncation), then windows of ``window``
                         tokens less the title's share, each ending at a sentence end or a word boundary in its
                         second half where there is one, the next starting ``overlap`` tokens earlier (at a word
                         start); a document that fits is one passage; → character spans into the text
    spans                (pure) the windows over one text's token offsets

A passage's model input is the title (cut to ``title_tokens``) + separator + the passage's text; the model adds the
document prompt. A text without a single token is one empty passage when the title has tokens, else quarantined
(``empty_after_tokenizing``).

Example::

    chunker = Chunker.from_model(model.tokenizer, cfg.chunk, max_seq_length=256, prompt="passage: ")
    spans, inputs, bad = chunker.split(["A title"], ["a long text ..."])   # spans[0] = [(0, 1240), (1102, 2398)]
"""

from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger(__name__)

MARGIN = 2  # tokens kept free when the window is the model's own: a passage re-tokenised alone may differ slightly
SENTENCE_ENDS = frozenset(".!?。！？;")


class ChunkError(ValueError):
    """The chunk settings cannot work with this model; the message names the setting and the fix."""


def spans(offsets: list[tuple[int, int]], text: str, budget: int, overlap: int) -> list[tuple[int, int]]:
    """Windows of at most ``budget`` tokens over one text's token ``offsets`` (character spans), consecutive windows
    sharing ``overlap`` tokens; every token lies in at least one window, and the spans run from the text's first
    character to its last (a text that fits is one span: the whole text). Cuts prefer a sentence end, then a word
    boundary, in the window's second half; a run without any boundary (one giant token sequence) is cut anywhere."""
    n = len(offsets)
    if n == 0:
        return []
    budget = max(budget, 1)

    def word_start(t: int) -> bool:  # a gap (whitespace) before token t: cutting there splits no word
        return t == 0 or t >= n or offsets[t][0] > offsets[t - 1][1]

    out: list[tuple[int, int]] = []
    i = 0
    while True:
        j = min(i + budget, n)
        if j < n:
            low = min(i + max(budget // 2, overlap + 1), j)  # a cut leaves the next window room to advance
            cut = next((t for t in range(j, low - 1, -1) if word_start(t)
                        and text[offsets[t - 1][0]:offsets[t - 1][1]][-1:] in SENTENCE_ENDS), None)
            if cut is None:
                cut = next((t for t in range(j, low - 1, -1) if word_start(t)), j)
            j = cut
        out.append((offsets[i][0] if out else 0, offsets[j - 1][1] if j < n else len(text)))
        if j >= n:  # the first passage starts at the text's start, the last ends at its end (whitespace included)
            return out
        nxt = max(j - overlap, i + 1)
        while nxt < j - 1 and not word_start(nxt):  # start the next passage at a word, not mid-word
            nxt += 1
        i = nxt


class Chunker:
    """Splits documents into passages for one bi-encoder (its tokenizer and input length)."""

    def __init__(self, tokenizer, *, window: int, overlap: int, title_tokens: int, enabled: bool = True,
                 fields: tuple[str, ...] = ("title", "text"), separator: str = " "):
        self.tokenizer, self.window, self.overlap = tokenizer, window, overlap
        self.title_tokens, self.enabled = title_tokens, enabled
        self.fields, self.separator = tuple(fields), separator

    @classmethod
    def from_model(cls, tokenizer, chunk_cfg, *, max_seq_length: int, prompt: str | None, model: str = "",
                   fields: tuple[str, ...] = ("title", "text"), separator: str = " ") -> Chunker:
        """The chunker for a model that reads ``max_seq_length`` tokens and prefixes passages with ``prompt``."""
        c = chunk_cfg
        if c.enabled and not getattr(tokenizer, "is_fast", False):
            raise ChunkError(f"chunk.enabled needs a fast tokenizer (character offsets); bi-encoder '{model}' has "
                             f"{type(tokenizer).__name__}: install `tokenizers` and use a model with a "
                             "tokenizer.json, or set chunk.enabled: false")
        specials = tokenizer.num_special_tokens_to_add(pair=False)
        prompt_tokens = len(tokenizer(prompt, add_special_tokens=False)["input_ids"]) if prompt else 0
        room = max_seq_length - specials - prompt_tokens
        if c.tokens is not None and c.tokens > room:
            raise ChunkError(f"chunk.tokens is {c.tokens}, but bi-encoder '{model}' reads {max_seq_length} tokens, "
                             f"{specials} special and {prompt_tokens} prompt token(s) among them: at most {room} "
                             f"text tokens fit; set chunk.tokens to {room} or less (or null: as many as fit)")
        window = c.tokens if c.tokens is not None else room - MARGIN
        overlap = c.overlap if c.overlap is not None else window // 8
        if window <= overlap or window < 2:
            raise ChunkError(f"a passage window of {window} tokens (bi-encoder '{model}', max_seq_length "
                             f"{max_seq_length}, {prompt_tokens} prompt token(s)) is not larger than chunk.overlap "
                             f"({overlap}); lower chunk.overlap (or raise embed.max_seq_length)")
        title = c.title_tokens if c.title_tokens is not None else window // 4
        return cls(tokenizer, window=window, overlap=overlap, title_tokens=max(0, min(title, window - overlap - 1)),
                   enabled=c.enabled, fields=fields, separator=separator)

    def _tokens(self, texts: list[str]) -> list[list[tuple[int, int]]]:
        if not texts:
            return []
        enc = self.tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True, truncation=False,
                             verbose=False)
        return [[tuple(o) for o in offs] for offs in enc["offset_mapping"]]

    def _title(self, titles: list[str | None]) -> tuple[list[str], list[int]]:
        """Each title as it enters the passages' input (cut to ``title_tokens``) and its token count."""
        if "title" not in self.fields:
            return [""] * len(titles), [0] * len(titles)
        if not self.enabled:  # whole documents: the title as it is
            return [t or "" for t in titles], [int(bool((t or "").strip())) for t in titles]
        cut, counts = [], []
        for title, offs in zip(titles, self._tokens([t or "" for t in titles])):
            if len(offs) > self.title_tokens:
                title, offs = title[:offs[self.title_tokens - 1][1]], offs[:self.title_tokens]
            cut.append(title or "")
            counts.append(len(offs))
        return cut, counts

    def split(self, titles: list[str | None], texts: list[str | None]
              ) -> tuple[list[list[tuple[int, int]]], list[list[str]], dict[int, str]]:
        """Per document: its passages' character spans into its text, their model inputs, and {row: reason} of the
        documents that give no passage at all (nothing to embed)."""
        titles_in, title_counts = self._title(titles)
        with_text = "text" in self.fields
        texts = [t or "" for t in texts]
        # chunking off: no offsets needed (each document is one passage, cut by the model as before)
        offsets = self._tokens(texts) if with_text and self.enabled else [[(0, len(t))] if t.strip() else []
                                                                          for t in texts]
        all_spans, inputs, bad = [], [], {}
        for row, (title, n_title, text, offs) in enumerate(zip(titles_in, title_counts, texts, offsets)):
            if not with_text:
                cuts = [(0, 0)]
            elif not offs:
                cuts = [(0, 0)] if n_title else []
            elif not self.enabled:
                cuts = [(0, len(text))]  # whole: the model cuts at max_seq_length
            else:
                cuts = spans(offs, text, self.window - n_title, self.overlap)
            if not cuts:
                bad[row] = ("the text holds no token the bi-encoder reads (only whitespace, control or unknown "
                            "characters) and there is no title: nothing to embed; fix the document's text")
            all_spans.append(cuts)
            inputs.append([self._input(title, text[a:b]) for a, b in cuts])
        return all_spans, inputs, bad

    def _input(self, title: str, passage: str) -> str:
        return self.separator.join(p for p in (title, passage) if p)

    def describe(self) -> dict[str, Any]:
        return {"enabled": self.enabled, "window_tokens": self.window, "overlap": self.overlap,
                "title_tokens": self.title_tokens}
