"""Teacher over any OpenAI-compatible chat-completions server (``vllm serve``, ``transformers serve``, ...).

Async ``httpx`` with a concurrency limit; each request is retried with exponential backoff and jitter on
HTTP 408/409/429/5xx, timeouts and connection errors (bounded by ``http_retries``; ``Retry-After`` is
honoured up to the backoff cap). Images travel as base64 ``data:`` URLs. Structured output:

- ``json_schema`` (default, ``auto``): ``response_format={"type": "json_schema", ...}`` (OpenAI, vLLM, SGLang);
- ``vllm``: vLLM's extra body ``structured_outputs={"json": schema}`` (vLLM >= 0.10.2) instead;
- ``none``: no constraint; every output is still validated by the orchestrator.

The API key is read from an environment variable (``api_key_env``) and sent as a bearer token; it is never
logged, printed or stored in outputs. What each answer becomes:

- HTTP 200 with a chat completion: the text (checked to be valid UTF-8; if not, a ``rejected`` result
  naming the bad bytes, so the orchestrator quarantines it with its reason).
- HTTP 200 whose body is not a chat completion (a proxy's HTML page, an empty body, an ``error`` object,
  truncated JSON): *transient*, retried like a 5xx; ``unavailable`` when retries run out (never a
  permanent rejection: a rerun asks again).
- HTTP 408/409/425/429/5xx, connection errors, and no complete answer within ``timeout`` seconds: retried.
  ``timeout`` is a total deadline per attempt (connect + send + the whole body), so a server trickling
  one byte at a time cannot stretch it.
- HTTP 401/403/404: the run stops at once (wrong key, URL or model); so does a redirect (3xx: cocoa does
  not follow one; the message names where it points) or a status below 200. Any other 2xx is read like a 200.
- Token counts in ``usage`` that are not whole numbers in 0..1e9 count as absent (0); a ``message.content``
  that is JSON but not a string is a ``rejected`` result keeping what was sent.
- Other 4xx: a per-request rejection (quarantined with the server's message) -- unless the server gives
  the *same* answer to ``max_identical_rejections`` requests in a row with no success in between (e.g.
  ``transformers serve`` answering 400 "Server is pinned to ..." for a wrong ``--model``): that is not
  about one request, so :class:`~cocoa.datagen.teachers.base.TeacherSystematicError` stops the run with
  the server's message, and nothing of that batch is quarantined.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
from collections.abc import Sequence
from typing import Any

from .base import (Teacher, TeacherError, TeacherRequest, TeacherResult, TeacherSystematicError, chat_messages,
                   data_url, printable, text_problem, token_count)

RETRY_STATUS = frozenset({408, 409, 425, 429})
FATAL_STATUS = {401: "unauthorized", 403: "forbidden", 404: "not found"}


def base_url_problem(url: str) -> str | None:
    """Why ``url`` cannot be an OpenAI-compatible server's base URL (one line naming --base-url), or None."""
    import urllib.parse

    import httpx

    shown = printable(str(url), 200)
    fix = "give the server's URL, e.g. --base-url http://127.0.0.1:8000/v1"
    if not isinstance(url, str) or not url.strip():
        return f"--base-url is empty; {fix}"
    if any(c.isspace() or ord(c) < 32 for c in url):
        return f"--base-url {shown!r} contains whitespace or a control character; {fix}"
    try:
        parts = urllib.parse.urlsplit(url)
        port = parts.port  # ValueError when not a number in 0..65535
    except ValueError as e:
        return f"--base-url {shown!r} is not a valid URL ({e}); {fix}"
    if parts.scheme.lower() not in ("http", "https"):
        what = f"its scheme is {parts.scheme!r}" if parts.scheme else "it has no scheme"
        return f"--base-url {shown!r}: {what}, and only http:// and https:// are served; {fix}"
    if not parts.hostname:
        return f"--base-url {shown!r} has no host; {fix}"
    if port is not None and not 0 < port <= 65535:
        return f"--base-url {shown!r}: port {port} is not in 1..65535; {fix}"
    try:
        httpx.URL(url.rstrip("/") + "/chat/completions")
    except Exception as e:  # httpx.InvalidURL and friends
        return f"--base-url {shown!r} is not a valid URL ({e}); {fix}"
    return None


class OpenAITeacher(Teacher):
    backend = "openai"

    def __init__(
        self,
        base_url: str,
        model: str,
        revision: str = "",
        *,
        api_key_env: str = "OPENAI_API_KEY",
        concurrency: int = 16,
        timeout: float = 300.0,
        http_retries: int = 5,
        structured: str = "auto",
        batch_size: int | None = None,
        backoff_base: float = 0.5,
        backoff_max: float = 30.0,
        max_identical_rejections: int = 5,
    ) -> None:
        if structured not in ("auto", "json_schema", "vllm", "none"):
            raise TeacherError(f"structured must be auto, json_schema, vllm or none, not {structured!r}")
        problem = base_url_problem(base_url)
        if problem:
            raise TeacherError(problem)
        self.base_url = base_url.rstrip("/")
        self.model = model
        self.revision = revision
        self.api_key_env = api_key_env
        self.__api_key = os.environ.get(api_key_env) or None  # name-mangled; never in repr or logs
        self.concurrency = max(1, int(concurrency))
        self.timeout = float(timeout)
        self.http_retries = max(0, int(http_retries))
        self.mode = "json_schema" if structured == "auto" else structured
        self.structured = self.mode != "none"
        self.batch_size = batch_size or 4 * self.concurrency
        self.backoff_base = backoff_base
        self.backoff_max = backoff_max
        self.max_identical_rejections = max(1, int(max_identical_rejections))
        self._same_rejection: tuple[str, int] = ("", 0)  # (answer, how many requests in a row got it)

    @property
    def url(self) -> str:
        return f"{self.base_url}/chat/completions"

    def _headers(self) -> dict[str, str]:
        h = {"Content-Type": "application/json"}
        if self.__api_key:
            h["Authorization"] = f"Bearer {self.__api_key}"
        return h

    # -- request body -------------------------------------------------------------------------------
    def body(self, r: TeacherRequest) -> dict[str, Any]:
        b: dict[str, Any] = {
            "model": self.model,
            "messages": chat_messages(r.prompt, {"type": "image_url", "image_url": {"url": data_url(r.image)}}),
            "temperature": r.sampling.temperature,
            "top_p": r.sampling.top_p,
            "max_tokens": r.sampling.max_tokens,
            "seed": r.seed,
            "n": 1,
            "stream": False,
        }
        if self.mode == "json_schema":
            b["response_format"] = {"type": "json_schema",
                                    "json_schema": {"name": f"cocoa_{r.task}", "schema": r.schema, "strict": True}}
        elif self.mode == "vllm":
            b["structured_outputs"] = {"json": r.schema}
        return b

    # -- sending ------------------------------------------------------------------------------------
    def generate(self, requests: Sequence[TeacherRequest]) -> list[TeacherResult]:
        if not requests:
            return []
        return asyncio.run(self._generate(list(requests)))

    async def _generate(self, requests: list[TeacherRequest]) -> list[TeacherResult]:
        import httpx

        limits = httpx.Limits(max_connections=self.concurrency, max_keepalive_connections=self.concurrency)
        timeout = httpx.Timeout(self.timeout, connect=min(self.timeout, 30.0))
        sem = asyncio.Semaphore(self.concurrency)
        async with httpx.AsyncClient(timeout=timeout, limits=limits, headers=self._headers()) as client:
            try:
                async with asyncio.TaskGroup() as tg:  # a fatal error cancels the other requests
                    tasks = [tg.create_task(self._one(client, sem, r)) for r in requests]
            except BaseExceptionGroup as eg:
                raise eg.exceptions[0] from None
        return [t.result() for t in tasks]

    def _delay(self, attempt: int, retry_after: str | None) -> float:
        d = min(self.backoff_max, self.backoff_base * (2 ** attempt)) * (0.5 + random.random())
        if retry_after:
            try:
                d = max(d, min(float(retry_after), self.backoff_max))
            except ValueError:
                pass
        return d

    def _served(self) -> None:
        self._same_rejection = ("", 0)

    def _rejected(self, status: int, text: str) -> None:
        """Count identical 4xx answers in a row; stop the run when they are clearly not per-request."""
        answer = f"HTTP {status}: {text[:300]}"
        same, n = self._same_rejection
        n = n + 1 if answer == same else 1
        self._same_rejection = (answer, n)
        if n >= self.max_identical_rejections:
            raise TeacherSystematicError(
                f"{self.url} refused {n} requests in a row with the same answer, {answer.strip()} -- this is not "
                f"about one request: check --model {self.model!r} (it must be the model the server serves), "
                "--base-url and the server's settings, then rerun (nothing was quarantined for these requests)")

    async def _one(self, client: Any, sem: asyncio.Semaphore, r: TeacherRequest) -> TeacherResult:
        import httpx

        payload = json.dumps(self.body(r)).encode()
        last = ""
        attempts = 0
        for attempt in range(self.http_retries + 1):
            attempts += 1
            retry_after = None
            try:
                async with sem:
                    # a total deadline: httpx's timeouts are per read, which a trickling server never trips
                    async with asyncio.timeout(self.timeout):
                        resp = await client.post(self.url, content=payload)
            except (TimeoutError, httpx.TimeoutException) as e:
                last = (f"timeout: no complete answer within {self.timeout:g} s ({type(e).__name__}) from {self.url}; "
                        "raise --request-timeout if the server is slow but working")
            except httpx.TransportError as e:
                last = f"cannot reach {self.url} ({type(e).__name__}: {e})"
            else:
                status = resp.status_code
                if 300 <= status < 400 or status < 200:
                    where = resp.headers.get("location")
                    what = (f"a redirect{' to ' + printable(where, 300) if where else ''}; cocoa does not follow "
                            "redirects: give the URL the server points to as --base-url (…/v1)"
                            if status >= 300 else "not a final answer of an HTTP server; check --base-url")
                    raise TeacherError(f"{self.url} answered HTTP {status} ({what})")
                if 200 <= status < 300:  # 200, or another 2xx whose body must still be a chat completion
                    result = self._parse(r, resp.content, attempts, status)
                    if isinstance(result, TeacherResult):
                        self._served()
                        return result
                    last = result  # not a chat completion: transient (a proxy's page, a truncated body)
                else:
                    text = resp.content.decode("utf-8", "replace")[:2000]
                    if status in FATAL_STATUS:
                        hint = (f"check the key in ${self.api_key_env}" if status in (401, 403)
                                else f"check --base-url (…/v1) and --model {self.model!r}")
                        raise TeacherError(f"{self.url} answered HTTP {status} ({FATAL_STATUS[status]}): {text[:300]}; {hint}")
                    if status in RETRY_STATUS or status >= 500:
                        last = f"HTTP {status} from {self.url}: {text[:300]}"
                        retry_after = resp.headers.get("retry-after")
                    else:  # 400, 413, 422, ...: this request cannot be served as it is (unless all are refused)
                        self._rejected(status, text)
                        return TeacherResult(r.key, None, error=f"HTTP {status}: {text}", error_kind="rejected",
                                             transport_attempts=attempts)
            if attempt < self.http_retries:
                await asyncio.sleep(self._delay(attempt, retry_after))
        return TeacherResult(r.key, None, error=f"{last} (after {attempts} attempts)", error_kind="unavailable",
                             transport_attempts=attempts)

    def _parse(self, r: TeacherRequest, raw: bytes, attempts: int, status: int = 200) -> TeacherResult | str:
        """The result of an HTTP 2xx, or (a str) why the body is not a chat completion (transient)."""
        try:
            body, bad_bytes = raw.decode("utf-8"), None
        except UnicodeDecodeError as e:
            body, bad_bytes = raw.decode("utf-8", "replace"), f"byte(s) {raw[e.start:e.end]!r} at offset {e.start}"
        try:
            data = json.loads(body)
            content = data["choices"][0]["message"].get("content")
        except (ValueError, RecursionError, KeyError, IndexError, TypeError, AttributeError) as e:
            # ValueError: bad JSON or an integer too long to read; RecursionError: nested too deeply
            what = "an empty body" if not body.strip() else f"{type(e).__name__}"
            return (f"HTTP {status} from {self.url} is not a chat completion ({what}; a proxy or gateway answering?): "
                    f"{printable(body, 300)!r}")
        if isinstance(content, list):  # some servers return content parts
            content = "".join(p.get("text", "") for p in content if isinstance(p, dict) and isinstance(p.get("text"), str))
        text = content if isinstance(content, str) else ""
        usage = data.get("usage") if isinstance(data.get("usage"), dict) else {}
        # a count that is not a whole number in 0..1e9 (negative, 1e999, "many") counts as absent
        tokens = {k: token_count(usage.get(k)) for k in ("prompt_tokens", "completion_tokens")}
        if content is not None and not isinstance(content, str):  # {"caption": ...}, 42, true: not text, kept as sent
            try:
                sent = json.dumps(content, ensure_ascii=False)
            except (ValueError, RecursionError):
                sent = body
            return TeacherResult(r.key, None, error=f"the answer's message.content is a JSON {type(content).__name__}, "
                                 f"not text: {printable(sent)}",
                                 error_kind="rejected", transport_attempts=attempts, **tokens)
        problem = (f"the HTTP body has invalid {bad_bytes}, shown as U+FFFD" if bad_bytes and "\ufffd" in text
                   else text_problem(text))
        if problem:
            return TeacherResult(r.key, None, error=f"the answer is not valid UTF-8 text ({problem}): {printable(text)}",
                                 error_kind="rejected", transport_attempts=attempts, **tokens)
        return TeacherResult(r.key, text, transport_attempts=attempts, **tokens)
