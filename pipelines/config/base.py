"""The base of every config section: strict types, no blank strings or empty lists, 64-bit integers, and error
messages that name the key and the fix; the settings shared by the stages that run a Ray actor pool.

Reads top to bottom::

    _Section            strict pydantic model every section derives from
    shared field types  actors / cpus_per_actor / gpus_per_actor / device / dtype / backend, declared once
    ActorPool           a stage's (actors, CPUs, GPUs per actor): ``cfg.embed.pool``, applied by
                        ``runtime.pool_resources`` in one place
    validation_message  pydantic errors as one line per key, with a hint for the commonest mistakes
"""

from __future__ import annotations

import difflib
from typing import Annotated, Any, Literal, NamedTuple

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator


class ConfigError(ValueError):
    """A config file that cannot run; the message names the key and the fix."""


INT64 = (-(1 << 63), (1 << 63) - 1)
MAY_BE_BLANK = {"separator"}  # the only settings that may be an empty (or all-space) string
Lax = Field(strict=False)  # for the few settings that take text for their value (times; `exact: "true"`)


class _Section(BaseModel):
    # strict: a YAML `true` is not the number 1, nor `0` false, nor `2.0` or "2" an integer (an integer is a float)
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False, strict=True)

    @field_validator("*")
    @classmethod
    def _usable(cls, v: Any, info: ValidationInfo) -> Any:
        """No setting is an empty list or a blank string (a path, URI, model or field name), and no integer
        exceeds the 64 bits that Arrow, numpy and Ray hold."""
        if isinstance(v, list) and not v:
            raise ValueError("must not be an empty list")
        for x in v if isinstance(v, list) else (v,):
            if type(x) is int and not INT64[0] <= x <= INT64[1]:
                raise ValueError("must fit in a signed 64-bit integer")
            if isinstance(x, str) and not x.strip() and info.field_name not in MAY_BE_BLANK:
                raise ValueError("must not be empty")
        return v



# The settings of every stage that runs a model on a Ray actor pool (embed, retrieve, rerank), declared once.
Actors = Annotated[int, Field(gt=0, description="actors in the stage's Ray pool (one model each): about one per "
                                                "1-2 CPU cores, or one per GPU")]
CpusPerActor = Annotated[float, Field(gt=0, description="CPUs each actor is given (its torch threads follow)")]
GpusPerActor = Annotated[float, Field(ge=0, description="GPUs each actor is given: 0 on CPU-only machines, 1 for "
                                                        "one GPU per actor")]
Device = Literal["auto", "cpu", "cuda", "mps"]
Dtype = Literal["auto", "float32", "float16", "bfloat16"]
Backend = Annotated[Literal["torch", "onnx", "onnx-int8", "openvino", "openvino-int8"], Field(
    description="torch; or on CPU an ONNX export of the model run by ONNX Runtime (onnx; onnx-int8: dynamically "
                "quantised) or by OpenVINO (openvino: bf16 where the CPU runs it natively and dtype allows, else "
                "f32; openvino-int8: NNCF static int8). int8 scores differ slightly: measure with the eval job")]


class ActorPool(NamedTuple):
    """One stage's actor pool as configured: how many actors, and the CPUs and GPUs each asks for."""

    actors: int
    cpus: float
    gpus: float


class PooledStage:
    """Mixin of the sections whose stage runs on an actor pool (fields ``actors``, ``cpus_per_actor``,
    ``gpus_per_actor``)."""

    @property
    def pool(self) -> ActorPool:
        return ActorPool(self.actors, self.cpus_per_actor, self.gpus_per_actor)


class ModelStage(PooledStage, _Section):
    """The settings shared by the two model stages (the bi-encoder's ``embed`` and the cross-encoder's ``rerank``):
    their actor pool, where and at what precision the model runs, and its backend."""

    actors: Actors = 2
    cpus_per_actor: CpusPerActor = 1.0
    gpus_per_actor: GpusPerActor = 0.0
    device: Device = "auto"
    dtype: Dtype = "auto"
    backend: Backend = "torch"
    trust_remote_code: bool = False

    @model_validator(mode="after")
    def _cuda_needs_a_gpu(self):
        if self.device == "cuda" and not self.gpus_per_actor:
            raise ValueError("device: cuda with gpus_per_actor: 0 would run on CPU (Ray gives an actor a GPU only "
                             "when it reserves one); set gpus_per_actor: 1 (or a fraction, to share a GPU), or "
                             "device: auto")
        if self.backend != "torch" and (self.device == "cuda" or self.gpus_per_actor):
            raise ValueError(f"backend: {self.backend} runs on CPU only (on a GPU the torch backend would run while "
                             "the table records this one); for a GPU use backend: torch (dtype: auto runs bf16 or "
                             "fp16), or keep this backend with gpus_per_actor: 0 and device: auto or cpu")
        return self


# Fixes for the commonest mistakes, keyed by dotted path; the generic message names the key anyway.
_HINTS = {
    "embed.batch_size": "lower it if the device runs out of memory; 16 is fastest on small CPUs",
    "embed.actors": "use 1 actor per GPU, or about one per 1-2 CPU cores",
    "embed.gpus_per_actor": "use 0 on CPU-only machines, 1 for one GPU per actor",
    "corpus.path": "point it at a .jsonl/.parquet/.csv file, a folder, a glob or a Lance dataset",
    "corpus.format": "use one of auto, jsonl, parquet, csv, lance",
    "rerank.batch_size": "lower it if the device runs out of memory",
    "rerank.gpus_per_actor": "use 0 on CPU-only machines, 1 for one GPU per actor",
    "query_log.path": "point it at a .jsonl/.parquet file, a folder or a glob of them",
    "index.ann.type": "use auto (exact below ann.min_rows), none, ivf_flat, ivf_pq, ivf_hnsw_sq or ivf_hnsw_pq",
    "retrieve.exact": "use auto (the exact matrix product while it is faster than ANN), true, false or lance_flat",
}


def _model_keys(model: type[BaseModel], loc: tuple) -> list[str]:
    """The keys accepted where ``loc`` points, through nested sections and lists of them (``schedules.0.cron``)."""
    from typing import get_args

    for part in loc[:-1]:
        if isinstance(part, int):  # an item of a list of sections: the section model is already current
            continue
        field = model.model_fields.get(str(part))
        ann = getattr(field, "annotation", None)
        ann = next((a for a in (ann, *get_args(ann)) if isinstance(a, type) and issubclass(a, BaseModel)), None)
        if ann is None:
            return []
        model = ann
    return list(model.model_fields)


def validation_message(exc: ValidationError, model: type[BaseModel], source: str, what: str = "config") -> str:
    """Every error of ``exc`` on one line each, naming the key and the fix (``ConfigError`` / ``ScheduleError``)."""
    lines = [_format_error(e, model, what) for e in exc.errors()]
    return f"{source}: invalid {what}\n  - " + "\n  - ".join(lines)


def _format_error(err: dict, model: type[BaseModel], what: str = "config") -> str:
    loc = tuple(err["loc"])
    key = ".".join(str(p) for p in loc) or "<top level>"
    given = err.get("input")
    if err["type"] == "extra_forbidden":
        close = difflib.get_close_matches(str(loc[-1]), _model_keys(model, loc), n=1)
        fix = f"did you mean '{close[0]}'?" if close else f"remove it (accepted here: {', '.join(_model_keys(model, loc))})"
        return f"{key}: unknown key; {fix}"
    if err["type"] == "missing":
        return f"{key}: required key is missing; add it to the {what}"
    msg = err["msg"].removeprefix("Value error, ")
    try:
        shown = repr(given)
    except RecursionError:
        shown = f"a {type(given).__name__} nested too deeply to show"
    text = f"{key} {msg[0].lower()}{msg[1:]} (got {shown})"
    hint = _HINTS.get(key)
    return f"{text}; {hint}" if hint else text

