"""Teacher over any OpenAI-compatible chat-completions server (``vllm serve``, ``transformers serve``, ...).

Async ``httpx`` with a concurrency limit; each request is retried with exponential backoff and jitter on
HTTP 408/409/429/5xx, timeouts and connection errors (bounded by ``http_retries``; ``Retry-After`` is
honoured up to the backoff cap). Images travel as base64 ``data:`` URLs. Structured output:

- ``json_schema`` (default, ``auto``): ``response_format={"type": "json_schema", ...}`` (OpenAI, vLLM, SGLang);
- ``vllm``: vLLM's extra body ``structured_outputs={"json": schema}`` (vLLM >= 0.10.2) instead;
- ``none``: no constraint; every output is still validated by the orchestrator.

The API key is read from an environment variable (``api_key_env``) and sent as a bearer token; it is never
logged, printed or stored in outputs. HTTP 401/403/404 stop the run at once (wrong key, URL or model); other
4xx answers are per-request rejections (quarantined with the server's message).
"""

from __future__ import annotations

import asyncio
import json
import os
import random
from collections.abc import Sequence
from typing import Any

from .base import Teacher, TeacherError, TeacherRequest, TeacherResult, chat_messages, data_url

RETRY_STATUS = frozenset({408, 409, 425, 429})
FATAL_STATUS = {401: "unauthorized", 403: "forbidden", 404: "not found"}


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
    ) -> None:
        if structured not in ("auto", "json_schema", "vllm", "none"):
            raise TeacherError(f"structured must be auto, json_schema, vllm or none, not {structured!r}")
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
                    resp = await client.post(self.url, content=payload)
            except httpx.TimeoutException as e:
                last = f"timeout after {self.timeout:g} s ({type(e).__name__}) from {self.url}"
            except httpx.TransportError as e:
                last = f"cannot reach {self.url} ({type(e).__name__}: {e})"
            else:
                status = resp.status_code
                if status == 200:
                    return self._parse(r, resp.text, attempts)
                text = resp.text[:2000]
                if status in FATAL_STATUS:
                    hint = (f"check the key in ${self.api_key_env}" if status in (401, 403)
                            else f"check --base-url (…/v1) and --model {self.model!r}")
                    raise TeacherError(f"{self.url} answered HTTP {status} ({FATAL_STATUS[status]}): {text[:300]}; {hint}")
                if status in RETRY_STATUS or status >= 500:
                    last = f"HTTP {status} from {self.url}: {text[:300]}"
                    retry_after = resp.headers.get("retry-after")
                else:  # 400, 413, 422, ...: this request cannot be served as it is
                    return TeacherResult(r.key, None, error=f"HTTP {status}: {text}", error_kind="rejected",
                                         transport_attempts=attempts)
            if attempt < self.http_retries:
                await asyncio.sleep(self._delay(attempt, retry_after))
        return TeacherResult(r.key, None, error=f"{last} (after {attempts} attempts)", error_kind="unavailable",
                             transport_attempts=attempts)

    def _parse(self, r: TeacherRequest, body: str, attempts: int) -> TeacherResult:
        try:
            data = json.loads(body)
            choice = data["choices"][0]
            content = choice["message"].get("content")
        except (json.JSONDecodeError, KeyError, IndexError, TypeError, AttributeError) as e:
            return TeacherResult(r.key, None, error=f"malformed chat-completion response ({type(e).__name__}): {body[:2000]}",
                                 error_kind="rejected", transport_attempts=attempts)
        if isinstance(content, list):  # some servers return content parts
            content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
        usage = data.get("usage") or {}
        return TeacherResult(
            r.key, content if isinstance(content, str) else "",
            prompt_tokens=int(usage.get("prompt_tokens") or 0), completion_tokens=int(usage.get("completion_tokens") or 0),
            transport_attempts=attempts,
        )
