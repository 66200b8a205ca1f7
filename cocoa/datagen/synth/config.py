"""Settings of `cocoa-data synth` (:class:`SynthConfig`, :class:`VllmOptions`), the per-backend defaults
and how the backend, model and key-relevant options resolve from them."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from ...config import Config, ConfigError
from ..schemas import MAX_CAPTION_CHARS, MAX_QA_CHARS
from ..teachers.base import Sampling

WRITER = "cocoa-data synth"  # the writer named in the provenance of every dataset this command writes
DEFAULT_TEACHER = "Qwen/Qwen2.5-VL-7B-Instruct"
SCENES_TEACHER = "cocoa/scenes-teacher"
MAX_NEW_TOKENS = 1_000_000  # --max-tokens above this is a typo, not a request
VLLM_MAX_PIXELS = 1003520  # 1280 * 28 * 28: ~1280 visual tokens for Qwen2/2.5-VL
#: Defaults of --max-tokens / --max-retries per backend. The transformers teacher runs on the local
#: device (often a CPU for a first try): 768 tokens x 3 attempts took 13 min for 24 requests there.
BACKEND_DEFAULTS: dict[str, dict[str, int]] = {
    "default": {"max_tokens": 768, "max_retries": 2},
    "transformers": {"max_tokens": 256, "max_retries": 1},
}


class VllmOptions(Config):
    """Offline vLLM engine settings (``--vllm-*``)."""

    tensor_parallel_size: int = Field(1, ge=1, description="GPUs per model replica (tensor parallel)")
    max_model_len: int = Field(8192, ge=256, description="Context length the engine reserves")
    gpu_memory_utilization: float = Field(0.9, gt=0, le=1, description="Fraction of GPU memory vLLM may use")
    max_num_seqs: int | None = Field(None, ge=1, description="Max concurrent sequences (vLLM default if unset)")
    dtype: str = Field("auto", description="Model dtype (auto, bfloat16, float16)")
    mode: Literal["chat", "generate"] = Field(
        "chat", description="chat: LLM.chat with the model's chat template; generate: Qwen-VL prompt + multi_modal_data")
    enforce_eager: bool = Field(False, description="Disable CUDA graphs / torch.compile (slower on a GPU, less memory; "
                                "on a CPU it saves ~20 s of engine start)")
    engine_kwargs: dict[str, Any] = Field(
        default_factory=dict,
        description="Any other vllm.LLM(...) keyword, as a YAML/JSON mapping, e.g. '{enable_prefix_caching: true, "
        "structured_outputs_config: {backend: xgrammar}, max_num_batched_tokens: 16384}'; its keys win over the "
        "--vllm-* fields (not model, revision, seed or the pixel limits: --model, --revision, --seed, --min-pixels, "
        "--max-pixels)")

    @field_validator("engine_kwargs")
    @classmethod
    def _v_engine_kwargs(cls, v: dict[str, Any]) -> dict[str, Any]:
        from ..teachers.vllm import engine_kwargs_problem

        problem = engine_kwargs_problem(v)
        if problem:
            raise ValueError(problem)
        return v


class SynthConfig(Config):
    """Settings of `cocoa-data synth` (YAML via --config, every field also a flag)."""

    source: Literal["scenes", "mmeb"] = Field("scenes", description="Source pairs: the embedded scenes or MMEB-train")
    out: str = Field("shards", description="Workspace root (writes original/, synthetic/, synthetic/quarantine/)")
    # sources
    scenes_dir: str | None = Field(None, description="A built scenes benchmark root (uses ROOT/original); default: "
                                   "OUT/original if another command wrote it, else generate --scenes-n pairs")
    scenes_n: int = Field(200, ge=1, description="Scene pairs to generate when no scenes dataset is given")
    scenes_seed: int = Field(0, description="Seed of the generated scene pairs")
    mmeb_dir: str | None = Field(None, description="Local MMEB-train snapshot (parquet + image zips); default: the hub")
    mmeb_split: Literal["original", "diverse_instruction"] = Field("original", description="MMEB-train instruction split")
    mmeb_image_dir: str | None = Field(None, description="Extracted MMEB-train images (instead of the zips)")
    subsets: list[str] = Field(default_factory=list, description="MMEB subsets, comma-separated (default: all)")
    max_per_subset: int | None = Field(None, ge=1, description="At most this many pairs per MMEB subset")
    limit: int | None = Field(None, ge=1, description="At most this many source pairs in total")
    # tasks and prompts
    tasks: list[Literal["caption", "qa"]] = Field(default_factory=lambda: ["caption", "qa"],
                                                 description="What to synthesise per image")
    qa_per_image: int = Field(3, ge=1, le=20, description="QA pairs asked for per image (k)")
    caption_chars: int = Field(MAX_CAPTION_CHARS, ge=8, le=100_000, description="Most characters in a caption (the "
                               "schema's maxLength: a structured decoder closes the string there; part of the keys)")
    qa_chars: int = Field(MAX_QA_CHARS, ge=4, le=100_000, description="Most characters in a question or an answer "
                          "(the schema's maxLength; part of the keys)")
    prompts: str | None = Field(None, description="Directory of *.j2 templates that add to / override the built-ins")
    # teacher
    backend: Literal["auto", "scenes", "vllm", "openai", "transformers"] = Field(
        "auto", description="Teacher backend (auto: scenes for --source scenes, vllm for mmeb)")
    model: str | None = Field(None, description=f"Teacher model id or directory (default {DEFAULT_TEACHER}; "
                              "the scenes teacher ignores it)")
    revision: str = Field("", description="Model revision recorded in keys and outputs")
    base_url: str | None = Field(None, description="OpenAI-compatible server, e.g. http://127.0.0.1:8000/v1")
    api_key_env: str = Field("OPENAI_API_KEY", description="Environment variable holding the API key (never logged)")
    concurrency: int = Field(16, ge=1, description="Concurrent HTTP requests (openai backend)")
    request_timeout: float = Field(300.0, gt=0, description="Seconds per HTTP request before it counts as failed")
    http_retries: int = Field(5, ge=0, description="Retries of a request on HTTP 429/5xx/timeouts (backoff)")
    structured: Literal["auto", "json_schema", "vllm", "none"] = Field(
        "auto", description="openai backend: how to ask for schema-constrained output (auto: response_format "
        "json_schema; vllm: vLLM's structured_outputs extra body too; none: rely on validation). vllm backend: "
        "none turns structured outputs off, anything else keeps them on")
    max_retries: int | None = Field(None, ge=0, description="Retries (new seed) of output that fails validation, then "
                                    "quarantine (default per backend: 2; transformers 1)")
    max_unavailable: int = Field(16, ge=1, description="Stop after this many requests in a row fail to be served")
    temperature: float = Field(0.7, ge=0, allow_inf_nan=False, description="Sampling temperature")
    top_p: float = Field(0.9, gt=0, le=1, allow_inf_nan=False, description="Nucleus sampling")
    max_tokens: int | None = Field(None, ge=1, le=MAX_NEW_TOKENS, description="Max new tokens per output (default per backend: 768; "
                                   "transformers 256, enough for a caption or 3 QA pairs and quick on a CPU; raise it "
                                   "for long captions or a larger --qa-per-image)")
    seed: int = Field(0, description="Base seed (per-request seeds derive from it and the request key)")
    min_pixels: int | None = Field(None, ge=1, description="Image min pixels for the processor (vllm/transformers)")
    max_pixels: int | None = Field(None, ge=1, description="Image max pixels for the processor (vllm: 1003520 if "
                                   "unset; transformers: the model's processor default)")
    device: str = Field("auto", description="transformers backend: cpu, cuda, cuda:1 or auto")
    dtype: str = Field("auto", description="transformers backend: float32, bfloat16, float16 or auto")
    batch_size: int | None = Field(None, ge=1, description="Requests per generate call (backend default if unset; "
                                   "vllm: 256, the most requests in the engine at once)")
    vllm: VllmOptions = Field(default_factory=VllmOptions)
    # work split and durability
    shard_index: int = Field(0, ge=0, description="This worker's index (0..num_shards-1)")
    num_shards: int = Field(1, ge=1, description="Number of workers splitting the work by request key")
    # engine (cocoa/datagen/synth/ray_engine.py; docs/synth.md "Scaling out")
    engine: Literal["local", "ray"] = Field("local", description="local: this process asks the teacher; ray: a Ray "
                                            "Data actor pool of --workers teachers (one GPU each for vllm/transformers "
                                            "on a GPU cluster) does, this process plans and writes")
    ray_address: str | None = Field(None, description="--engine ray: the cluster to join (e.g. ray://head:10001 or "
                                    "auto); default $RAY_ADDRESS, else a local cluster started for the run")
    workers: int = Field(1, ge=1, le=4096, description="--engine ray: teacher actors (model replicas)")
    ray_gpus: float | None = Field(None, ge=0, le=64, description="--engine ray: GPUs per teacher actor (default: "
                                   "--vllm-tensor-parallel-size for vllm, 1 for transformers on a cuda device, else 0)")
    commit_every: int = Field(256, ge=1, description="Commit a shard after this many finished records")
    commit_seconds: float = Field(120.0, gt=0, description="...or after this many seconds")
    # modes
    dry_run: bool = Field(False, description="Render prompts and count requests; no generation, nothing written")
    show: int = Field(3, ge=0, description="Prompts to print in --dry-run")
    overwrite: bool = Field(False, description="Delete earlier synth output in OUT first")
    progress: bool = Field(True, description="Show a progress bar")

    @model_validator(mode="after")
    def _v(self) -> SynthConfig:
        if self.shard_index >= self.num_shards:
            raise ValueError(f"shard_index {self.shard_index} must be < num_shards {self.num_shards}")
        if not self.tasks:
            raise ValueError("tasks is empty; give caption, qa or both")
        needs_model = self.backend in ("vllm", "openai", "transformers") or (
            self.backend == "auto" and self.source != "scenes")
        if needs_model and self.model is not None and not self.model.strip():
            raise ValueError(f"--model is empty; give the teacher model (e.g. --model {DEFAULT_TEACHER})")
        if self.base_url is not None:  # checked before any output exists
            from ..teachers.openai import base_url_problem

            problem = base_url_problem(self.base_url)
            if problem:
                raise ValueError(problem)
        return self

    def resolved_max_tokens(self, backend: str | None = None) -> int:
        if self.max_tokens is not None:
            return self.max_tokens
        return BACKEND_DEFAULTS.get(backend or self.resolved_backend(), BACKEND_DEFAULTS["default"])["max_tokens"]

    def resolved_max_retries(self, backend: str | None = None) -> int:
        if self.max_retries is not None:
            return self.max_retries
        return BACKEND_DEFAULTS.get(backend or self.resolved_backend(), BACKEND_DEFAULTS["default"])["max_retries"]

    def sampling(self, backend: str | None = None) -> Sampling:
        return Sampling(temperature=self.temperature, top_p=self.top_p, max_tokens=self.resolved_max_tokens(backend),
                        seed=self.seed)

    def resolved_backend(self) -> str:
        if self.backend != "auto":
            return self.backend
        if self.source == "scenes":
            return "scenes"
        if vllm_available():
            return "vllm"
        raise ConfigError(
            "--source mmeb needs a teacher model and vLLM is not installed here (the default backend). "
            "Install it (`pip install vllm`), or use an OpenAI-compatible server: "
            "`--backend openai --base-url http://HOST:PORT/v1 --model NAME`, "
            "or a local model with transformers: `--backend transformers --model DIR`"
        )

    def resolved_model(self) -> str:
        backend = self.resolved_backend()
        if backend == "scenes":
            return SCENES_TEACHER
        if self.model:
            return self.model
        if backend == "transformers":
            raise ConfigError("--backend transformers needs --model (a model id or a local directory)")
        return DEFAULT_TEACHER

    def key_options(self, backend: str | None = None) -> dict[str, Any]:
        """Backend options that change what the model sees (part of each request key)."""
        backend = backend or self.resolved_backend()
        if backend == "vllm":
            return {"min_pixels": self.min_pixels, "max_pixels": self.max_pixels or VLLM_MAX_PIXELS}
        if backend == "transformers":
            return {"min_pixels": self.min_pixels, "max_pixels": self.max_pixels}
        return {}


def vllm_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("vllm") is not None
