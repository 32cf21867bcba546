"""The ``openvino-int8`` backend's model: NNCF's static int8 quantisation of the exported fp32 ONNX graph
(``pipelines/models/onnx.py`` exports it and caches the result), saved as OpenVINO IR beside it.

Static quantisation needs calibration inputs: general English of every length a model reads (``calibration_texts``:
1 to 24 sentences, queries and passages alike; for a cross-encoder, (start of one text, another text) pairs), so
that no corpus has to be at hand when an actor first loads the model. ``model_type=TRANSFORMER`` applies
SmoothQuant and keeps the attention's softmax in float. The int8 model is checked against the fp32 graph before it
is kept (``int8_agreement``: the lowest cosine of pooled vectors, or the scores' correlation), and refused below
0.9; its agreement is recorded in the export's meta. What it costs in ranking quality is the eval job's to say
(``benchmarks/backend_quality_scifact.py``).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

# bump when the calibration texts or settings change: cached int8 exports are made again
CALIBRATION_VERSION = 1
_SENTENCES = (
    "Vitamin D supplements did not reduce the rate of fractures in older adults.",
    "How do I reset the password of my router?",
    "The central bank raised interest rates by a quarter of a point on Tuesday.",
    "Mutations in the BRCA1 gene increase the lifetime risk of breast cancer.",
    "what is the capital of australia",
    "The recipe needs two cups of flour, three eggs and a pinch of salt.",
    "Researchers trained a neural network on 1.2 million labelled images.",
    "The court ruled that the contract was void because one party had been misled.",
    "Symptoms include fever, a dry cough and tiredness lasting more than a week.",
    "In 1969, Apollo 11 landed the first humans on the Moon.",
    "Replace the filter every three months to keep the air purifier efficient.",
    "Is it safe to take ibuprofen with paracetamol?",
    "The enzyme binds its substrate at the active site and lowers the activation energy.",
    "Our quarterly revenue grew 12% year over year, driven by cloud services.",
    "The river floods every spring when the snow melts in the mountains.",
    "Install the package with pip, then import it and call the main function.",
    "Patients in the treatment arm had lower blood pressure after six months (p < 0.01).",
    "The novel follows a young woman who leaves her village to study law in the city.",
    "best hiking trails near denver for beginners",
    "Coral reefs are dying as ocean temperatures rise and the water turns more acidic.",
    "The train to Berlin leaves at 7:45 from platform 4.",
    "T cells recognise antigens presented by MHC molecules on the surface of infected cells.",
    "Stock prices fell sharply after the company cut its forecast for the year.",
    "Children who read every day develop a larger vocabulary by the age of ten.",
)


def calibration_texts() -> list[str]:
    """``_SENTENCES`` joined in runs of 1, 3, 8 and 24 (96 texts, ~15 to ~500 tokens)."""
    n = len(_SENTENCES)
    return [" ".join(_SENTENCES[(i + j) % n] for j in range(k)) for k in (1, 3, 8, 24) for i in range(n)]


def quantize_openvino(work: Path, meta: dict[str, Any], kind: str, refuse) -> dict[str, Any]:
    """NNCF's static int8 of ``work``/model.onnx, saved as OpenVINO IR beside it; checked against the fp32 graph
    (cosine of the pooled vectors, or the scores' agreement). Returns what the export's meta gains."""
    import contextlib
    import io

    import nncf
    import openvino as ov
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(work))
    inputs, length = meta["inputs"], meta.get("max_seq_length") or meta.get("max_length") or 512
    texts = calibration_texts()

    def feeds(chunk: list[str]) -> dict[str, np.ndarray]:
        args = (chunk,) if kind == "bi-encoder" else ([t[:120] for t in chunk], chunk[::-1])  # (query, document)
        enc = tok(*args, padding=True, truncation=True, max_length=length, return_tensors="np",
                  return_token_type_ids="token_type_ids" in inputs)
        return {n: np.asarray(enc[n], dtype=np.int64) for n in {*inputs, "attention_mask"}}

    batches = [feeds(texts[i:i + 8]) for i in range(0, len(texts), 8)]
    nncf.set_log_level(logging.ERROR)
    with contextlib.redirect_stdout(io.StringIO()):  # NNCF's progress bars: not for a job's log
        quantized = nncf.quantize(ov.Core().read_model(str(work / "model.onnx")),
                                  nncf.Dataset(batches, lambda b: {n: b[n] for n in inputs}),
                                  model_type=nncf.ModelType.TRANSFORMER, subset_size=len(batches))
    ov.save_model(quantized, str(work / "model.ov-int8.xml"), compress_to_fp16=False)
    agreement = int8_agreement(work, meta, kind, batches[::3])
    if agreement < 0.9:
        raise refuse(f"its int8 model disagrees with the fp32 one (agreement {agreement:.3f} on sample texts)")
    return {"openvino_model": "model.ov-int8.xml", "calibration_texts": len(texts), "int8_agreement": agreement}


def int8_agreement(work: Path, meta: dict[str, Any], kind: str, batches: list[dict]) -> float:
    """The int8 IR against the fp32 graph on ``batches``: the lowest cosine of mean-pooled vectors (bi-encoder), or
    the scores' Pearson correlation (cross-encoder)."""
    from pipelines.models.onnx_runtime import OvSession, ort_session

    fp32, int8 = ort_session(work / "model.onnx", None), OvSession(work / "model.ov-int8.xml", None)
    names = meta["inputs"]
    ref, got = [], []
    for b in batches:
        a, q = (s.run(None, {n: b[n] for n in names})[0] for s in (fp32, int8))
        if kind == "bi-encoder":
            mask = b["attention_mask"][..., None].astype(np.float32)
            a, q = ((x * mask).sum(1) / mask.sum(1) for x in (a, q))
        ref.append(a.reshape(len(a), -1))
        got.append(q.reshape(len(q), -1))
    ref_m, got_m = np.concatenate(ref), np.concatenate(got)
    if kind == "bi-encoder":
        cos = (ref_m * got_m).sum(1) / (np.linalg.norm(ref_m, axis=1) * np.linalg.norm(got_m, axis=1))
        return round(float(cos.min()), 4)
    return round(float(np.corrcoef(ref_m[:, 0], got_m[:, 0])[0, 1]), 4)
