"""Offline vLLM teacher: ``vllm.LLM`` with one image per prompt, structured outputs, per-request seeds.

Request building is pure and testable without vLLM: :func:`engine_kwargs` (``LLM(...)`` arguments),
:func:`sampling_kwargs` (``SamplingParams(...)`` arguments, the schema under the API generation's name),
:func:`chat_conversation` (``LLM.chat`` messages with a data-URL image part) and :func:`generate_prompt`
(``LLM.generate`` input with ``multi_modal_data`` and the Qwen-VL chat layout).

Structured outputs: vLLM >= 0.12 has ``vllm.sampling_params.StructuredOutputsParams`` (passed as
``SamplingParams(structured_outputs=...)``) and removed ``GuidedDecodingParams`` (``guided_decoding=...``);
:func:`structured_api` detects which one the installed vLLM has, by import.
"""

from __future__ import annotations

from collections.abc import Sequence
from types import ModuleType
from typing import Any

from .base import Teacher, TeacherError, TeacherRequest, TeacherResult, chat_messages, data_url, checked_result

QWEN_VL_PROMPT = (
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>{prompt}<|im_end|>\n"
    "<|im_start|>assistant\n"
)


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


def engine_kwargs(model: str, *, revision: str = "", tensor_parallel_size: int = 1, max_model_len: int = 8192,
                  gpu_memory_utilization: float = 0.9, max_num_seqs: int | None = None, dtype: str = "auto",
                  enforce_eager: bool = False, min_pixels: int | None = None, max_pixels: int | None = None,
                  seed: int = 0) -> dict[str, Any]:
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
    return kw


def sampling_kwargs(r: TeacherRequest, api: tuple[str, type] | None) -> dict[str, Any]:
    """``SamplingParams`` arguments for one request: its seed, and its schema when structured outputs exist."""
    kw: dict[str, Any] = {
        "n": 1,
        "temperature": r.sampling.temperature,
        "top_p": r.sampling.top_p,
        "max_tokens": r.sampling.max_tokens,
        "seed": r.seed,
    }
    if api is not None:
        field, cls = api
        kw[field] = cls(json=r.schema)
    return kw


def chat_conversation(r: TeacherRequest) -> list[dict[str, Any]]:
    """``LLM.chat`` messages: the image as a data-URL part (works across vLLM versions), then the prompt."""
    return chat_messages(r.prompt, {"type": "image_url", "image_url": {"url": data_url(r.image)}})


def generate_prompt(r: TeacherRequest, image: Any) -> dict[str, Any]:
    """``LLM.generate`` input: Qwen-VL chat layout with one image placeholder + ``multi_modal_data``."""
    return {"prompt": QWEN_VL_PROMPT.format(prompt=r.prompt), "multi_modal_data": {"image": image}}


class VllmTeacher(Teacher):
    backend = "vllm"

    def __init__(self, model: str, revision: str = "", *, mode: str = "chat", batch_size: int = 512,
                 **engine: Any) -> None:
        try:
            import vllm
            import vllm.sampling_params as sp
        except ImportError:
            raise TeacherError(
                "the vllm backend needs vLLM (`pip install vllm`, CUDA); alternatives: "
                "`--backend openai --base-url http://HOST:PORT/v1` (e.g. a `vllm serve` elsewhere) or "
                "`--backend transformers --model DIR`"
            ) from None
        if mode not in ("chat", "generate"):
            raise TeacherError(f"vllm mode must be chat or generate, not {mode!r}")
        self.model, self.revision, self.mode = model, revision, mode
        self.batch_size = batch_size
        self._api = structured_api(sp)
        self.structured = self._api is not None
        self._SamplingParams = vllm.SamplingParams
        self.llm = vllm.LLM(**engine_kwargs(model, revision=revision, **engine))

    def generate(self, requests: Sequence[TeacherRequest]) -> list[TeacherResult]:
        if not requests:
            return []
        params = [self._SamplingParams(**sampling_kwargs(r, self._api)) for r in requests]
        if self.mode == "chat":
            outs = self.llm.chat([chat_conversation(r) for r in requests], sampling_params=params, use_tqdm=False)
        else:
            from ...records import decode_image

            inputs = [generate_prompt(r, decode_image(r.image)) for r in requests]
            outs = self.llm.generate(inputs, sampling_params=params, use_tqdm=False)
        results = []
        for r, o in zip(requests, outs):
            c = o.outputs[0]
            results.append(checked_result(r.key, c.text, prompt_tokens=len(o.prompt_token_ids or []),
                                          completion_tokens=len(c.token_ids or [])))
        return results
