"""Tiny random models of the architectures behind the most used sentence-transformers and cross-encoder checkpoints,
built in-process (no download): BERT, MPNet, RoBERTa, XLM-RoBERTa, DeBERTa-v2, ModernBERT and ELECTRA.

Each gets the tokenizer kind its real checkpoints use, from a small vocabulary: word-piece (BERT, ELECTRA, MPNet),
byte-level BPE trained here with ``tokenizers`` (RoBERTa, ModernBERT), Unigram / SentencePiece-style (XLM-RoBERTa,
DeBERTa-v2). Models are 2 layers of width 32 with each architecture's own features switched on where they change
the graph: ELECTRA's smaller embedding projected up, DeBERTa-v3's bucketed relative positions (16 buckets, fewer
than the 64 tokens texts may have), ModernBERT's alternating global and sliding-window attention (window 16).

``build_bi_encoder(arch, folder, pooling)`` saves a sentence-transformers folder (Transformer, Pooling ``mean`` or
``cls``, Normalize after mean pooling as all-mpnet-base-v2 has; none after CLS), ``build_cross_encoder(arch,
folder)`` a one-logit ``CrossEncoder``; weights are initialised wide enough (``INIT``) that texts' vectors and
pairs' scores differ.
"""

from __future__ import annotations

import string
from pathlib import Path

ARCHS = ("bert", "mpnet", "roberta", "xlm-roberta", "deberta-v2", "modernbert", "electra")
MAX_LENGTH = 64
WORDS = ["the", "a", "of", "and", "to", "in", "is", "for", "on", "with", "how", "learn", "machine", "learning",
         "guide", "study", "studying", "cooking", "recipes", "beginners", "cell", "cells", "protein", "gene", "cancer",
         "risk", "vitamin", "brain", "data", "model", "binding", "number", "long", "text", "about"]
CHARS = string.ascii_lowercase + string.digits
# Weights' init std: the usual 0.02 gives every text nearly the same [CLS] vector (~1e-3 apart on unit vectors) and
# every pair a score within ~1e-4 of 0.5 (see test_onnx_backend), too close for a tolerance to mean something. Per
# architecture, a width that spreads vectors and sigmoid scores without saturating them.
INIT = {"bert": 0.2, "mpnet": 0.2, "roberta": 0.4, "xlm-roberta": 0.2, "deberta-v2": 0.2, "modernbert": 0.2,
        "electra": 0.2}


def _wordpiece_vocab(specials: list[str], last: list[str] = ()) -> dict[str, int]:
    pieces = [*specials, *CHARS, *(f"##{c}" for c in CHARS), *WORDS, *last]
    return {w: i for i, w in enumerate(dict.fromkeys(pieces))}


def _unigram_vocab(specials: list[str], last: list[str] = ()) -> list[tuple[str, float]]:
    """SentencePiece-style pieces: whole words after the word marker are likelier than letters, so a known word is
    one piece and an unknown one falls back to letters."""
    pieces = [(s, 0.0) for s in specials] + [("▁" + w, -3.0) for w in WORDS] + [("▁", -4.0)]
    pieces += [("▁" + c, -6.0) for c in CHARS] + [(c, -7.0) for c in CHARS]
    return pieces + [(s, 0.0) for s in last]


def _byte_bpe(specials: list[str]):
    """A byte-level BPE (RoBERTa's and ModernBERT's kind) trained on the word list: whole words merge, any other
    text falls back to bytes."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, min_frequency=1, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([" ".join(WORDS)] * 4 + [f" {w}" for w in WORDS], trainer)
    return tok


def tokenizer(arch: str):
    """The tokenizer of ``arch``'s real checkpoints, on a small vocabulary."""
    import json

    from transformers import (BertTokenizerFast, DebertaV2Tokenizer, MPNetTokenizer, PreTrainedTokenizerFast,
                              RobertaTokenizer, XLMRobertaTokenizer)

    if arch in ("bert", "electra"):
        # The vocabulary as a dict: transformers 5 ignores ``vocab_file=`` (see conftest).
        return BertTokenizerFast(vocab=_wordpiece_vocab(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]),
                                 do_lower_case=True)
    if arch == "mpnet":
        return MPNetTokenizer(vocab=_wordpiece_vocab(["<s>", "<pad>", "</s>", "[UNK]"], ["<mask>"]), do_lower_case=True)
    if arch == "xlm-roberta":  # its tokenizer fixes <unk> at id 3
        return XLMRobertaTokenizer(vocab=_unigram_vocab(["<s>", "<pad>", "</s>", "<unk>"], ["<mask>"]))
    if arch == "deberta-v2":
        return DebertaV2Tokenizer(vocab=_unigram_vocab(["[PAD]", "[CLS]", "[SEP]", "[UNK]"], ["[MASK]"]),
                                  do_lower_case=False)
    if arch == "roberta":
        bpe = json.loads(_byte_bpe(["<s>", "<pad>", "</s>", "<unk>", "<mask>"]).to_str())["model"]
        return RobertaTokenizer(vocab=bpe["vocab"], merges=[tuple(m) for m in bpe["merges"]])
    if arch == "modernbert":  # a BPE tokenizer.json with BERT's special tokens, as ModernBERT ships
        from tokenizers import processors

        specials = ["[UNK]", "[CLS]", "[SEP]", "[PAD]", "[MASK]"]
        tok = _byte_bpe(specials)
        cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
        tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]",
                                                           special_tokens=[("[CLS]", cls), ("[SEP]", sep)])
        return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", cls_token="[CLS]", sep_token="[SEP]",
                                       pad_token="[PAD]", mask_token="[MASK]",
                                       model_input_names=["input_ids", "attention_mask"])
    raise ValueError(f"unknown architecture {arch!r}; one of {ARCHS}")


def config(arch: str, tok, **extra):
    """A 2-layer, width-32 config of ``arch`` sized to ``tok``."""
    from transformers import (BertConfig, DebertaV2Config, ElectraConfig, ModernBertConfig, MPNetConfig,
                              RobertaConfig, XLMRobertaConfig)

    common = dict(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                  intermediate_size=64, pad_token_id=tok.pad_token_id, **extra)
    # RoBERTa-style position ids start after the padding id: room for MAX_LENGTH tokens past it.
    positions = dict(max_position_embeddings=MAX_LENGTH + tok.pad_token_id + 2)
    if arch == "bert":
        return BertConfig(max_position_embeddings=128, **common)
    if arch == "electra":
        return ElectraConfig(embedding_size=16, max_position_embeddings=128, **common)
    if arch == "mpnet":
        return MPNetConfig(bos_token_id=tok.cls_token_id, eos_token_id=tok.sep_token_id, **positions, **common)
    if arch in ("roberta", "xlm-roberta"):
        cls = RobertaConfig if arch == "roberta" else XLMRobertaConfig
        return cls(bos_token_id=tok.cls_token_id, eos_token_id=tok.sep_token_id, type_vocab_size=1, **positions,
                   **common)
    if arch == "deberta-v2":  # DeBERTa-v3's settings
        return DebertaV2Config(max_position_embeddings=128, relative_attention=True, position_buckets=16,
                               max_relative_positions=-1, pos_att_type=["p2c", "c2p"], position_biased_input=False,
                               norm_rel_ebd="layer_norm", share_att_key=True, type_vocab_size=0, **common)
    if arch == "modernbert":  # layer 0 global attention, layer 1 a 16-token sliding window
        return ModernBertConfig(max_position_embeddings=128, local_attention=16, global_attn_every_n_layers=2,
                                cls_token_id=tok.cls_token_id, sep_token_id=tok.sep_token_id,
                                bos_token_id=tok.cls_token_id, eos_token_id=tok.sep_token_id, **common)
    raise ValueError(f"unknown architecture {arch!r}; one of {ARCHS}")


def build_transformer(arch: str, folder: Path) -> Path:
    """A random ``arch`` encoder and its tokenizer saved as a Hugging Face folder (made once per folder)."""
    import torch
    from transformers import AutoModel

    out = folder / f"{arch}-raw"
    if not (out / "config.json").is_file():
        torch.manual_seed(0)
        tok = tokenizer(arch)
        AutoModel.from_config(config(arch, tok, initializer_range=INIT[arch])).save_pretrained(out)
        tok.save_pretrained(out)
    return out


def build_bi_encoder(arch: str, folder: Path, pooling: str = "mean", *, include_prompt: bool = True,
                     prompts: dict[str, str] | None = None, default_prompt_name: str | None = None) -> Path:
    """A sentence-transformers folder: the random ``arch`` encoder, ``pooling`` (``mean`` then Normalize, or
    ``cls``), ``max_seq_length`` 64."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer import modules

    transformer = modules.Transformer(str(build_transformer(arch, folder)), max_seq_length=MAX_LENGTH)
    layers = [transformer, modules.Pooling(transformer.get_embedding_dimension(), pooling_mode=pooling,
                                           include_prompt=include_prompt)]
    if pooling == "mean":
        layers.append(modules.Normalize())
    suffix = "" if include_prompt and not prompts else "-prompts" if include_prompt else "-prompt-excluded"
    out = folder / f"{arch}-{pooling}{suffix}"
    SentenceTransformer(modules=layers, device="cpu", prompts=prompts,
                        default_prompt_name=default_prompt_name).save(str(out))
    return out


def build_cross_encoder(arch: str, folder: Path) -> Path:
    """A ``CrossEncoder`` folder: the random ``arch`` encoder with a one-logit sequence-classification head,
    ``max_length`` 64, the default Sigmoid activation."""
    import torch
    from sentence_transformers import CrossEncoder
    from transformers import AutoModelForSequenceClassification

    out = folder / f"{arch}-cross-encoder"
    torch.manual_seed(0)
    tok = tokenizer(arch)
    cfg = config(arch, tok, num_labels=1, initializer_range=INIT[arch])
    AutoModelForSequenceClassification.from_config(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    CrossEncoder(str(out), num_labels=1, max_length=MAX_LENGTH, device="cpu").save(str(out))
    return out
