"""Run by tests/test_vllm_real.py with the vLLM venv's Python (not collected by pytest):

    python tests/vllm_greedy.py SPEC.json OUT.json

Builds the project's ``VllmTeacher`` as ``cocoa-data synth --backend vllm`` does and writes, generating greedily
without a schema, for a fixed prompt set, what the engine was fed and what it generated, in both modes
(``LLM.chat`` and ``LLM.generate``): prompt token ids, generated token ids, finish reasons. Also records the
settings the engine runs with (to check that engine keywords pass through) and the one-line error for an
unknown engine keyword.

SPEC: {"model": DIR, "max_pixels": int, "max_tokens": int, "engine": {LLM keywords},
       "requests": [{"prompt": str, "image": PATH}, ...]}
"""

import json
import os
import sys

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")


def main() -> None:
    spec = json.loads(open(sys.argv[1]).read())
    from cocoa.datagen.schemas import json_schema
    from cocoa.datagen.teachers.base import Sampling, TeacherError, TeacherRequest
    from cocoa.datagen.teachers.vllm import VllmTeacher

    settings = dict(dtype="float32", max_model_len=4096, enforce_eager=True, max_pixels=spec["max_pixels"])
    out: dict = {}
    try:  # refused before any engine starts
        VllmTeacher(spec["model"], structured=False, extra={"enable_prefix_cachin": True}, **settings)
    except TeacherError as e:
        out["unknown_keyword_error"] = str(e)
    t = VllmTeacher(spec["model"], extra=spec["engine"], **settings)  # as synth builds it: structured outputs on
    greedy = Sampling(temperature=0.0, top_p=1.0, max_tokens=spec["max_tokens"])
    reqs = [TeacherRequest(key=str(i), task="caption", prompt=r["prompt"], image=open(r["image"], "rb").read(),
                           schema=json_schema("caption"), seed=i, sampling=greedy)
            for i, r in enumerate(spec["requests"])]
    for mode in ("chat", "generate"):
        out[mode] = [{"prompt_ids": list(o.prompt_token_ids), "ids": list(o.outputs[0].token_ids),
                      "finish": o.outputs[0].finish_reason} for o in t.outputs(reqs, mode=mode, structured=False)]
    c = t.llm.llm_engine.vllm_config
    out["engine"] = {
        "structured_outputs_backend": c.structured_outputs_config.backend,
        "disable_any_whitespace": c.structured_outputs_config.disable_any_whitespace,
        "max_model_len": c.model_config.max_model_len,
        "limit_mm_per_prompt": {"image": c.model_config.multimodal_config.get_limit_per_prompt("image")},
        "mm_processor_kwargs": c.model_config.multimodal_config.mm_processor_kwargs,
        "enable_chunked_prefill": c.scheduler_config.enable_chunked_prefill,
        "max_num_seqs": c.scheduler_config.max_num_seqs,
        "tensor_parallel_size": c.parallel_config.tensor_parallel_size,
        "data_parallel_size": c.parallel_config.data_parallel_size,
        "dtype": str(c.model_config.dtype),
    }
    out["engine_calls"] = t.engine_calls
    with open(sys.argv[2], "w") as f:
        json.dump(out, f)


if __name__ == "__main__":
    main()
