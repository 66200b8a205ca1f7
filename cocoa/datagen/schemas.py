"""Output schemas for teacher synthesis.

Each task has a pydantic model; its JSON schema drives structured decoding where a backend supports it
(vLLM ``StructuredOutputsParams`` / ``GuidedDecodingParams``, OpenAI ``response_format``), and every raw
output is validated against it with :func:`parse_output`, whatever the backend. Every object in a schema is
closed (``additionalProperties: false``, :func:`close_objects`): with an open object a grammar-constrained
model may keep adding keys until it runs out of tokens. The text bounds (``caption_chars``, ``qa_chars``)
are ``maxLength`` in the schema, so a grammar closes each string in time; the defaults are
:data:`MAX_CAPTION_CHARS` and :data:`MAX_QA_CHARS`. Invalid output is never
repaired silently: :class:`OutputError` carries a short machine-readable ``reason`` (``empty``,
``invalid_json``, ``schema``) and the detail; the orchestrator retries with a new seed and finally
quarantines the raw text.
"""

from __future__ import annotations

import json
import re
from functools import lru_cache
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model, field_validator

from ..records import canonical_json, digest

Task = Literal["caption", "qa"]
TASKS: tuple[str, ...] = ("caption", "qa")

MAX_CAPTION_CHARS = 4000
MAX_QA_CHARS = 1000


class OutputError(ValueError):
    """Teacher output that does not satisfy the task's schema."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def _clean(v: str, what: str, limit: int) -> str:
    v = " ".join(v.split())
    if not v:
        raise ValueError(f"{what} is empty")
    if len(v) > limit:
        raise ValueError(f"{what} has {len(v)} characters, above the limit of {limit}")
    return v


class CaptionOutput(BaseModel):
    """A fine-grained caption of one image."""

    model_config = ConfigDict(extra="forbid")
    caption: str = Field(min_length=1, max_length=MAX_CAPTION_CHARS,
                         description="A detailed, factual description of the image.")

    @field_validator("caption")
    @classmethod
    def _v(cls, v: str) -> str:
        return _clean(v, "caption", MAX_CAPTION_CHARS)


class QAPair(BaseModel):
    model_config = ConfigDict(extra="forbid")
    question: str = Field(min_length=1, max_length=MAX_QA_CHARS)
    answer: str = Field(min_length=1, max_length=MAX_QA_CHARS)

    @field_validator("question", "answer")
    @classmethod
    def _v(cls, v: str, info: Any) -> str:
        return _clean(v, info.field_name, MAX_QA_CHARS)


class _QABase(BaseModel):
    model_config = ConfigDict(extra="forbid")
    qa: list[QAPair]

    @field_validator("qa")
    @classmethod
    def _v_unique(cls, v: list[QAPair]) -> list[QAPair]:
        seen: set[str] = set()
        for p in v:
            q = p.question.casefold()
            if q in seen:
                raise ValueError(f"question {p.question!r} is repeated")
            seen.add(q)
        return v


def _check_chars(name: str, v: int) -> None:
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise ValueError(f"{name} must be a whole number >= 1 (got {v!r})")


def _cleaner(limit: int, *fields: str) -> Any:
    def clean(cls: Any, v: str, info: Any) -> str:
        return _clean(v, info.field_name, limit)

    return field_validator(*fields)(classmethod(clean))


@lru_cache(maxsize=64)
def caption_model(caption_chars: int = MAX_CAPTION_CHARS) -> type[BaseModel]:
    """The caption output model with captions of at most ``caption_chars`` characters."""
    _check_chars("caption_chars", caption_chars)
    if caption_chars == MAX_CAPTION_CHARS:
        return CaptionOutput
    return create_model(
        "CaptionOutput", __doc__=CaptionOutput.__doc__, __config__=ConfigDict(extra="forbid"),
        __validators__={"_v": _cleaner(caption_chars, "caption")},
        caption=(str, Field(min_length=1, max_length=caption_chars,
                            description="A detailed, factual description of the image.")),
    )


@lru_cache(maxsize=64)
def qa_pair_model(qa_chars: int = MAX_QA_CHARS) -> type[BaseModel]:
    """One question-answer pair, each text at most ``qa_chars`` characters."""
    _check_chars("qa_chars", qa_chars)
    if qa_chars == MAX_QA_CHARS:
        return QAPair
    return create_model(
        "QAPair", __config__=ConfigDict(extra="forbid"), __validators__={"_v": _cleaner(qa_chars, "question", "answer")},
        question=(str, Field(min_length=1, max_length=qa_chars)), answer=(str, Field(min_length=1, max_length=qa_chars)),
    )


@lru_cache(maxsize=64)
def qa_model(k: int, qa_chars: int = MAX_QA_CHARS) -> type[BaseModel]:
    """The QA output model for up to ``k`` pairs (at least one): ``{"qa": [{question, answer}, ...]}``."""
    if k < 1:
        raise ValueError(f"qa_per_image must be >= 1 (got {k})")
    pair = qa_pair_model(qa_chars)
    return create_model(
        f"QAOutput{k}",
        __base__=_QABase,
        qa=(list[pair], Field(min_length=1, max_length=k, description=f"1 to {k} question-answer pairs grounded in the image.")),  # type: ignore[valid-type]
    )


def output_model(task: str, k: int = 3, *, caption_chars: int = MAX_CAPTION_CHARS,
                 qa_chars: int = MAX_QA_CHARS) -> type[BaseModel]:
    if task == "caption":
        return caption_model(caption_chars)
    if task == "qa":
        return qa_model(k, qa_chars)
    raise ValueError(f"unknown task {task!r}; known: {', '.join(TASKS)}")


def close_objects(schema: Any) -> Any:
    """A copy of a JSON schema in which every object is closed: ``additionalProperties: false`` wherever an
    object is described (``type: object`` or ``properties``) and the key is absent or ``true``, at any depth
    (``$defs``, ``items``, ``anyOf``, ...). A structured decoder then cannot add keys the schema does not name."""
    if isinstance(schema, list):
        return [close_objects(x) for x in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: close_objects(v) for k, v in schema.items()}
    t = out.get("type")
    is_object = t == "object" or (isinstance(t, list) and "object" in t) or isinstance(out.get("properties"), dict)
    if is_object and out.get("additionalProperties", True) is True:
        out["additionalProperties"] = False
    return out


def json_schema(task: str, k: int = 3, *, caption_chars: int = MAX_CAPTION_CHARS,
                qa_chars: int = MAX_QA_CHARS) -> dict[str, Any]:
    """The JSON schema for structured decoding (``additionalProperties: false`` everywhere)."""
    return close_objects(output_model(task, k, caption_chars=caption_chars, qa_chars=qa_chars).model_json_schema())


def schema_hash(task: str, k: int = 3, *, caption_chars: int = MAX_CAPTION_CHARS, qa_chars: int = MAX_QA_CHARS) -> str:
    return digest(canonical_json(json_schema(task, k, caption_chars=caption_chars, qa_chars=qa_chars)))[:16]


_FENCE = re.compile(r"^\s*```(?:json)?\s*(.*?)\s*```\s*$", re.S)


def parse_output(task: str, raw: str, k: int = 3, *, caption_chars: int = MAX_CAPTION_CHARS,
                 qa_chars: int = MAX_QA_CHARS) -> BaseModel:
    """Validate raw teacher text as the task's output; raises :class:`OutputError` with a reason.

    A single surrounding Markdown code fence (```json ... ```) is tolerated, as chat models often add
    one when decoding is unconstrained; nothing else is repaired.
    """
    text = (raw or "").strip()
    if not text:
        raise OutputError("empty", "the teacher returned no text")
    m = _FENCE.match(text)
    if m:
        text = m.group(1)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise OutputError("invalid_json", f"not valid JSON ({e.msg} at line {e.lineno} column {e.colno})") from None
    except RecursionError:
        raise OutputError("invalid_json", "not usable JSON (nested too deeply to read)") from None
    except ValueError as e:  # e.g. an integer longer than Python's int max str digits
        raise OutputError("invalid_json", f"not usable JSON ({str(e)[:200]})") from None
    try:
        return output_model(task, k, caption_chars=caption_chars, qa_chars=qa_chars).model_validate(data)
    except RecursionError:
        raise OutputError("schema", "output: nested too deeply to validate") from None
    except ValidationError as e:
        errs = []
        for err in e.errors()[:3]:
            loc = ".".join(str(x) for x in err["loc"]) or "output"
            errs.append(f"{loc}: {err['msg']}")
        raise OutputError("schema", "; ".join(errs)) from None
