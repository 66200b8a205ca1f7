"""Teacher backends behind one interface (:class:`~cocoa.datagen.teachers.base.Teacher`).

``scenes`` (programmatic, from scene graphs), ``vllm`` (offline engine), ``openai`` (any
OpenAI-compatible server, e.g. ``vllm serve``) and ``transformers`` (local ``generate``). Each module
imports its heavy dependencies lazily.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .base import Sampling, Teacher, TeacherError, TeacherRequest, TeacherResult, TeacherSystematicError

if TYPE_CHECKING:
    from ..synth import SynthConfig

BACKENDS = ("scenes", "vllm", "openai", "transformers")


def build_teacher(config: SynthConfig) -> Teacher:
    """The teacher a :class:`~cocoa.datagen.synth.SynthConfig` asks for."""
    backend = config.resolved_backend()
    model = config.resolved_model()
    if backend == "scenes":
        from .scenes import ScenesTeacher

        return ScenesTeacher()
    if backend == "openai":
        from .openai import OpenAITeacher

        if not config.base_url:
            raise TeacherError("--backend openai needs --base-url (e.g. http://127.0.0.1:8000/v1 for `vllm serve`)")
        return OpenAITeacher(
            base_url=config.base_url, model=model, revision=config.revision, api_key_env=config.api_key_env,
            concurrency=config.concurrency, timeout=config.request_timeout, http_retries=config.http_retries,
            structured=config.structured, batch_size=config.batch_size,
        )
    if backend == "transformers":
        from .hf import TransformersTeacher

        return TransformersTeacher(
            model=model, revision=config.revision, device=config.device, dtype=config.dtype,
            batch_size=config.batch_size or 4, min_pixels=config.min_pixels, max_pixels=config.max_pixels,
        )
    if backend == "vllm":
        from .vllm import DEFAULT_CHUNK, VllmTeacher

        v = config.vllm
        return VllmTeacher(
            model=model, revision=config.revision, tensor_parallel_size=v.tensor_parallel_size,
            max_model_len=v.max_model_len, gpu_memory_utilization=v.gpu_memory_utilization,
            max_num_seqs=v.max_num_seqs, dtype=v.dtype, mode=v.mode, enforce_eager=v.enforce_eager,
            min_pixels=config.min_pixels, max_pixels=config.key_options()["max_pixels"], seed=config.seed,
            batch_size=config.batch_size or DEFAULT_CHUNK, structured=config.structured != "none",
            extra=v.engine_kwargs,
        )
    raise TeacherError(f"unknown backend {backend!r}; known: {', '.join(BACKENDS)}")


__all__ = ["BACKENDS", "Sampling", "Teacher", "TeacherError", "TeacherRequest", "TeacherResult", "TeacherSystematicError",
           "build_teacher"]
