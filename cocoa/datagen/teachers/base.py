"""The teacher interface: one small class per backend, each with ``generate(requests) -> results``.

A :class:`TeacherRequest` is self-contained (rendered prompt, encoded image bytes, JSON schema of the
expected output, a per-attempt seed); a :class:`TeacherResult` carries the raw text (validated later by
the orchestrator, never here), token counts, and, when no text could be obtained, why:

- ``error_kind="rejected"``: the backend refused this one request for a reason a retry cannot fix
  (e.g. HTTP 400 "prompt too long"). The orchestrator quarantines it with the server's answer as raw text.
- ``error_kind="unavailable"``: the request could not be served after bounded transport retries (HTTP
  429/5xx, timeouts, connection errors). It is *not* quarantined (a rerun retries it); the run ends
  incomplete with a clear message.

Configuration problems that would fail every request (no such model, bad API key, vLLM missing) raise
:class:`TeacherError` at once; so does a *systematic* failure noticed while running (the server refuses
several requests in a row with the same answer, e.g. ``transformers serve`` pinned to another model):
:class:`TeacherSystematicError`, a :class:`TeacherError` whose message carries the server's answer.
Nothing of the batch that hit it is quarantined, and the run stops with a non-zero exit.

A teacher's text is checked with :func:`text_problem` before it leaves the backend: text that is not valid
UTF-8 (invalid bytes in an HTTP body, a lone surrogate from a ``\\ud83d`` JSON escape) cannot be stored in
a shard, so it becomes a ``rejected`` result whose error shows the text with the bad parts escaped.
"""

from __future__ import annotations

import base64
import io
import math
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from ...records import TeacherInfo
from ...errors import CocoaError

ErrorKind = Literal["rejected", "unavailable"]


class TeacherError(CocoaError):
    """A teacher cannot run at all (missing package, model, credentials); the message says what to do."""


class TeacherSystematicError(TeacherError):
    """Every request fails the same way (the same HTTP 4xx answer several times in a row): the run stops
    with the server's message instead of quarantining each request as if it were the request's fault."""


@dataclass(frozen=True)
class Sampling:
    """Decoding settings shared by all backends (part of every request key)."""

    temperature: float = 0.7
    top_p: float = 0.9
    max_tokens: int = 768
    seed: int = 0

    def as_dict(self) -> dict[str, Any]:
        return {"temperature": self.temperature, "top_p": self.top_p, "max_tokens": self.max_tokens, "seed": self.seed}


@dataclass
class TeacherRequest:
    key: str
    task: str
    prompt: str
    image: bytes
    schema: dict[str, Any]
    seed: int
    sampling: Sampling
    attempt: int = 0
    k: int = 3
    context: dict[str, Any] = field(default_factory=dict)


@dataclass
class TeacherResult:
    key: str
    text: str | None
    error: str | None = None
    error_kind: ErrorKind | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    transport_attempts: int = 1
    #: why generation stopped, where the backend says: ``"stop"`` (the model or grammar ended it) or
    #: ``"length"`` (it hit ``max_tokens``: output that does not parse is then quarantined as ``truncated``)
    finish_reason: str | None = None


def text_problem(text: str) -> str | None:
    """Why ``text`` cannot be stored as UTF-8 (a lone surrogate), or None when it can."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        return f"character {e.object[e.start:e.end]!a} at offset {e.start} is not valid UTF-8 ({e.reason})"
    return None


MAX_TOKEN_COUNT = 10**9  # far above any context window: a larger count is not a real one


def token_count(v: Any) -> int:
    """A token count a server or teacher reported, as an int; anything that is not a whole number in
    0..MAX_TOKEN_COUNT (negative, NaN, infinite, 1e30, a string, a bool) counts as absent (0)."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return 0
    if isinstance(v, float) and not (math.isfinite(v) and v.is_integer()):
        return 0
    return int(v) if 0 <= v <= MAX_TOKEN_COUNT else 0


def printable(text: str, limit: int = 2000) -> str:
    """``text`` cut to ``limit`` characters with anything that is not valid UTF-8 escaped (safe to store)."""
    return text[:limit].encode("utf-8", "backslashreplace").decode("utf-8")


def checked_result(key: str, text: str, **kw: Any) -> TeacherResult:
    """A result for ``text``, or a ``rejected`` one naming the problem when it cannot be stored as UTF-8."""
    problem = text_problem(text)
    if problem:
        return TeacherResult(key, None, error=f"the answer is not valid UTF-8 text ({problem}): {printable(text)}",
                             error_kind="rejected", **kw)
    return TeacherResult(key, text, **kw)


class Teacher(ABC):
    """Base class. Subclasses set ``backend``, ``model``, ``revision`` and implement :meth:`generate`."""

    backend: str = ""
    model: str = ""
    revision: str = ""
    #: whether outputs are constrained to the schema (structured decoding) by the backend
    structured: bool = False
    #: how many requests the orchestrator should hand over per ``generate`` call
    batch_size: int = 64

    @abstractmethod
    def generate(self, requests: Sequence[TeacherRequest]) -> list[TeacherResult]:
        """One result per request, in order."""

    def options(self) -> dict[str, Any]:
        """Backend settings that change what the model sees or writes (part of the request key)."""
        return {}

    def info(self) -> TeacherInfo:
        return TeacherInfo(backend=self.backend, model=self.model, revision=self.revision)

    def close(self) -> None:
        pass

    def __enter__(self) -> Teacher:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:  # never include credentials
        return f"{type(self).__name__}(model={self.model!r}, revision={self.revision!r})"


def image_mime(data: bytes) -> str:
    """MIME type from magic bytes; ``""`` if not PNG/JPEG/GIF/WebP."""
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "image/png"
    if data.startswith(b"\xff\xd8\xff"):
        return "image/jpeg"
    if data[:6] in (b"GIF87a", b"GIF89a"):
        return "image/gif"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    return ""


def data_url(data: bytes) -> str:
    """A base64 ``data:`` URL; formats servers may not read (BMP, TIFF, ...) are re-encoded as PNG."""
    mime = image_mime(data)
    if mime not in ("image/png", "image/jpeg", "image/webp"):
        from ...records import decode_image

        buf = io.BytesIO()
        decode_image(data).save(buf, format="PNG")
        data, mime = buf.getvalue(), "image/png"
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def chat_messages(prompt: str, image_part: dict[str, Any]) -> list[dict[str, Any]]:
    """OpenAI-style chat messages: one user turn, the image first, then the instruction."""
    return [{"role": "user", "content": [image_part, {"type": "text", "text": prompt}]}]
