"""Teacher backends: scenes (from scene graphs), vLLM request building (+ GPU integration), transformers.
The vLLM engine itself runs for real in tests/test_vllm_real.py."""

import base64
import importlib.util
import json
import re
from dataclasses import dataclass
from types import SimpleNamespace

import pytest

from cocoa.datagen.schemas import json_schema, parse_output
from cocoa.sources.scenes import Scene, iter_train_pairs
from cocoa.datagen.teachers import vllm as vb
from cocoa.datagen.teachers.base import Sampling, TeacherError, TeacherRequest, data_url
from cocoa.datagen.teachers.scenes import ScenesTeacher

HAS_VLLM = importlib.util.find_spec("vllm") is not None


def _cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:
        return False


@pytest.fixture(scope="module")
def pairs():
    return list(iter_train_pairs(30, seed=3))


def _req(pair, task="caption", role="query", seed=0, k=3, image=None, prompt="Describe.", sampling=None):
    img = image or (pair.qry_image if role == "query" else pair.pos_image).bytes
    return TeacherRequest(key=f"{pair.id}:{task}:{role}:{seed}", task=task, prompt=prompt, image=img,
                          schema=json_schema(task, k), seed=seed, sampling=sampling or Sampling(), k=k,
                          context={"meta": pair.meta, "role": role, "dataset": pair.source})


# -- scenes teacher ---------------------------------------------------------------------------------
def test_scenes_teacher_writes_details_the_coarse_texts_lack(pairs):
    t = ScenesTeacher()
    with_images = [p for p in pairs if p.qry_image is not None]
    res = t.generate([_req(p) for p in with_images])
    for p, r in zip(with_images, res):
        cap = parse_output("caption", r.text).caption
        scene = Scene.from_dict(p.meta["scene"])
        n = len(scene.objects)
        assert f"{['no', 'one', 'two', 'three', 'four', 'five', 'six'][n]} object" in cap
        for o in scene.objects:  # every object's size, material and colour are stated
            assert f"{o.size} {o.material} {o.color} {o.shape}" in cap
            if o.text:
                assert f"'{o.text}'" in cap
        # the coarse original text has none of the sizes/materials
        assert not any(f"{o.size} {o.material}" in (p.qry_text + p.pos_text) for o in scene.objects)
        assert r.completion_tokens > 0


def test_scenes_teacher_qa_answers_are_correct(pairs):
    t = ScenesTeacher()
    checked = 0
    for p in pairs:
        if p.qry_image is None:
            continue
        scene = Scene.from_dict(p.meta["scene"])
        for seed in range(3):
            out = parse_output("qa", t.generate([_req(p, "qa", seed=seed, k=5)])[0].text, k=5)
            assert 1 <= len(out.qa) <= 5
            for qa in out.qa:
                m = re.fullmatch(r"How many (\w+) objects are there\?", qa.question)
                if m and m.group(1) in {o.color for o in scene.objects}:
                    assert int(qa.answer) == scene.count(color=m.group(1))
                    checked += 1
                if qa.question == "How many objects are in the scene?":
                    assert int(qa.answer) == len(scene.objects)
                    checked += 1
    assert checked > 3


def test_scenes_teacher_is_deterministic_per_seed_and_focuses_crops(pairs):
    t = ScenesTeacher()
    p = next(p for p in pairs if p.qry_image is not None)
    a, b, c = t.generate([_req(p, "qa", seed=1), _req(p, "qa", seed=1), _req(p, "qa", seed=2)])
    assert a.text == b.text
    ground = [p for p in pairs if p.meta["task"] == "grounding"]
    if ground:
        g = ground[0]
        target = Scene.from_dict(g.meta["scene"]).objects[g.meta["target"]]
        cap = parse_output("caption", t.generate([_req(g, role="positive")])[0].text).caption
        assert cap.startswith("A close-up crop of") and f"{target.color} {target.shape}" in cap


def test_scenes_teacher_rejects_records_without_a_scene_graph(pairs):
    p = pairs[0].model_copy(update={"meta": {}})
    r = ScenesTeacher().generate([_req(p, image=(pairs[0].qry_image or pairs[0].pos_image).bytes)])[0]
    assert r.text is None and r.error_kind == "rejected" and "scene graph" in r.error


# -- vLLM request building (no vLLM needed) --------------------------------------------------------
@dataclass
class _StructuredOutputsParams:  # the shape of vllm.sampling_params.StructuredOutputsParams (>= 0.12)
    json: dict | None = None


@dataclass
class _GuidedDecodingParams:  # the shape of vllm.sampling_params.GuidedDecodingParams (< 0.12)
    json: dict | None = None


def test_vllm_structured_api_detection_for_both_generations():
    new = SimpleNamespace(StructuredOutputsParams=_StructuredOutputsParams, GuidedDecodingParams=_GuidedDecodingParams)
    assert vb.structured_api(new) == ("structured_outputs", _StructuredOutputsParams)
    old = SimpleNamespace(GuidedDecodingParams=_GuidedDecodingParams)
    assert vb.structured_api(old) == ("guided_decoding", _GuidedDecodingParams)
    assert vb.structured_api(SimpleNamespace()) is None


def test_vllm_sampling_kwargs(pairs):
    r = _req(pairs[0] if pairs[0].qry_image else pairs[1], "qa", seed=1234, k=4,
             sampling=Sampling(temperature=0.3, top_p=0.8, max_tokens=200))
    kw = vb.sampling_kwargs(r, ("structured_outputs", _StructuredOutputsParams))
    assert kw["seed"] == 1234 and kw["temperature"] == 0.3 and kw["top_p"] == 0.8 and kw["max_tokens"] == 200
    assert kw["structured_outputs"].json == json_schema("qa", 4) and "guided_decoding" not in kw
    kw = vb.sampling_kwargs(r, ("guided_decoding", _GuidedDecodingParams))
    assert kw["guided_decoding"].json["properties"]["qa"]["maxItems"] == 4 and "structured_outputs" not in kw
    assert "structured_outputs" not in vb.sampling_kwargs(r, None)


def test_vllm_engine_kwargs():
    kw = vb.engine_kwargs("Qwen/Qwen2.5-VL-7B-Instruct", revision="abc", tensor_parallel_size=2, max_model_len=4096,
                          min_pixels=3136, max_pixels=1003520, max_num_seqs=64)
    assert kw["limit_mm_per_prompt"] == {"image": 1}
    assert kw["mm_processor_kwargs"] == {"min_pixels": 3136, "max_pixels": 1003520}
    assert kw["tensor_parallel_size"] == 2 and kw["max_model_len"] == 4096 and kw["revision"] == "abc"
    assert kw["max_num_seqs"] == 64
    assert "mm_processor_kwargs" not in vb.engine_kwargs("m") and "revision" not in vb.engine_kwargs("m")


def test_vllm_engine_kwargs_pass_through_any_llm_keyword():
    kw = vb.engine_kwargs("m", max_model_len=4096, min_pixels=3136, max_pixels=12544,
                          structured_outputs_config=vb.STRUCTURED_OUTPUTS_CONFIG,
                          extra={"data_parallel_size": 2, "tensor_parallel_size": 4, "enable_prefix_caching": True,
                                 "structured_outputs_config": {"backend": "xgrammar"},
                                 "limit_mm_per_prompt": {"image": 2}, "mm_processor_kwargs": {"fps": 1}})
    assert kw["data_parallel_size"] == 2 and kw["tensor_parallel_size"] == 4 and kw["enable_prefix_caching"] is True
    # mapping-valued keywords merge key by key: the user's keys win, cocoa's others stay
    assert kw["structured_outputs_config"] == {"backend": "xgrammar", "disable_any_whitespace": True}
    assert kw["limit_mm_per_prompt"] == {"image": 2}
    assert kw["mm_processor_kwargs"] == {"min_pixels": 3136, "max_pixels": 12544, "fps": 1}
    assert kw["max_model_len"] == 4096 and kw["model"] == "m"
    assert "structured_outputs_config" not in vb.engine_kwargs("m")  # None: vLLM's own default


@pytest.mark.parametrize("extra, says", [
    ({"model": "x"}, "use --model"), ({"seed": 1}, "use --seed"), ({"revision": "r"}, "use --revision"),
    ({"mm_processor_kwargs": {"max_pixels": 5}}, "--min-pixels / --max-pixels"),
    ({"mm_processor_kwargs": {"size": {}}}, "--min-pixels / --max-pixels"),
    ({"limit_mm_per_prompt": {"image": 0}}, "limit_mm_per_prompt.image"),
    ({"structured_outputs_config": "guidance"}, "must be a mapping"), ({"1a": 1}, "not a keyword name"),
    ([1, 2], "mapping of vllm.LLM keywords"),
])
def test_vllm_engine_kwargs_refused_in_one_line(extra, says):
    assert says in vb.engine_kwargs_problem(extra)
    with pytest.raises(TeacherError, match="--vllm-engine-kwargs"):
        vb.engine_kwargs("m", extra=extra)


def test_vllm_engine_kwargs_from_flags_and_yaml(tmp_path):
    from click.testing import CliRunner

    from cocoa.cli.data import cli
    from cocoa.datagen.synth import SynthConfig

    cfg = tmp_path / "synth.yaml"
    cfg.write_text("vllm:\n  engine_kwargs:\n    data_parallel_size: 2\n    structured_outputs_config: {backend: xgrammar}\n")
    assert SynthConfig.from_yaml(cfg).vllm.engine_kwargs == {"data_parallel_size": 2,
                                                             "structured_outputs_config": {"backend": "xgrammar"}}
    runner = CliRunner()
    for flag, says in [("{a: ", "--vllm-engine-kwargs: '{a: ' is not a YAML/JSON mapping"),
                       ("{model: x}", "model is set by cocoa"), ("[1]", "valid dictionary")]:
        r = runner.invoke(cli, ["synth", "--source", "mmeb", "--backend", "vllm", "--model", "m", "--out",
                                 str(tmp_path / "o"), "--vllm-engine-kwargs", flag])
        assert r.exit_code == 2 and says in r.output and "Traceback" not in r.output, r.output
    assert not (tmp_path / "o").exists()


def test_vllm_unknown_engine_keyword_names_close_matches():
    @dataclass
    class EngineArgs:
        enable_prefix_caching: bool = False
        max_model_len: int = 0

    class LLM:
        def __init__(self, model, *, seed=0, **kwargs):
            pass

    known = vb.engine_keywords(LLM, EngineArgs)
    assert known == {"model", "seed", "enable_prefix_caching", "max_model_len"}
    assert vb.unknown_keywords({"model": "m", "max_model_len": 1}, known) is None
    msg = vb.unknown_keywords({"model": "m", "enable_prefix_cachin": True}, known)
    assert "'enable_prefix_cachin'" in msg and "did you mean enable_prefix_caching" in msg


def test_vllm_schemas_close_every_object(pairs):
    from cocoa.datagen.schemas import close_objects

    open_schema = {"type": "object", "properties": {"a": {"type": "object", "properties": {"b": {"type": "string"}}},
                                                    "c": {"type": "array", "items": {"properties": {}}},
                                                    "d": {"anyOf": [{"type": ["object", "null"]}, {"type": "string"}]}},
                   "$defs": {"X": {"type": "object", "additionalProperties": True}},
                   "additionalProperties": {"type": "string"}}  # a schema for extra keys is the user's choice
    closed = close_objects(open_schema)
    assert closed["properties"]["a"]["additionalProperties"] is False
    assert closed["properties"]["c"]["items"]["additionalProperties"] is False
    assert closed["properties"]["d"]["anyOf"][0]["additionalProperties"] is False
    assert "additionalProperties" not in closed["properties"]["d"]["anyOf"][1]
    assert closed["$defs"]["X"]["additionalProperties"] is False
    assert closed["additionalProperties"] == {"type": "string"} and "additionalProperties" not in open_schema["properties"]["a"]
    # the request's schema reaches the engine closed, whatever the caller built
    r = _req(next(p for p in pairs if p.qry_image is not None))
    r.schema = open_schema
    kw = vb.sampling_kwargs(r, ("structured_outputs", _StructuredOutputsParams))
    assert kw["structured_outputs"].json == closed
    for task, k in [("caption", 3), ("qa", 1), ("qa", 5)]:  # cocoa's own are closed already
        assert close_objects(json_schema(task, k)) == json_schema(task, k)


def test_schema_text_bounds_are_max_length_and_validated():
    from cocoa.datagen.schemas import OutputError, schema_hash

    s = json_schema("caption", caption_chars=48)
    assert s["properties"]["caption"]["maxLength"] == 48 and s["title"] == "CaptionOutput"
    q = json_schema("qa", 1, qa_chars=32)
    assert q["$defs"]["QAPair"]["properties"]["answer"]["maxLength"] == 32 and q["properties"]["qa"]["maxItems"] == 1
    assert schema_hash("caption", caption_chars=48) != schema_hash("caption")
    assert parse_output("caption", '{"caption": "a  red cube"}', caption_chars=48).caption == "a red cube"
    with pytest.raises(OutputError, match="at most 48"):
        parse_output("caption", json.dumps({"caption": "x" * 49}), caption_chars=48)
    with pytest.raises(OutputError, match="answer is empty"):
        parse_output("qa", '{"qa": [{"question": "q", "answer": "  "}]}', 1, qa_chars=32)
    assert len(parse_output("caption", json.dumps({"caption": "y" * 5000}), caption_chars=6000).caption) == 5000


def test_output_cut_off_by_max_tokens_is_quarantined_as_truncated(tmp_path):
    from cocoa.datagen.synth import SynthConfig, run_synth
    from cocoa.datagen.teachers.base import Teacher, TeacherResult
    from cocoa.shards import open_dataset

    class CutOff(Teacher):
        backend, model = "mine", "cut-off"

        def generate(self, requests):
            return [TeacherResult(r.key, '{"caption": "a red cu', prompt_tokens=10, completion_tokens=5,
                                  finish_reason="length") for r in requests]

    s = run_synth(SynthConfig(source="scenes", scenes_n=3, out=str(tmp_path / "o"), tasks=["caption"],
                              max_tokens=5, progress=False), teacher=CutOff())
    assert s.reasons and set(s.reasons) == {"truncated"} and s.generate_seconds > 0
    q = list(open_dataset(tmp_path / "o" / "synthetic" / "quarantine"))
    assert q and all("--max-tokens 5" in r.detail and "invalid_json" in r.detail for r in q)
    assert s.as_dict()["generated_tokens_per_s"] > 0 and s.as_dict()["prompt_tokens_per_s"] > 0


def test_vllm_generate_mode_uses_the_model_chat_layout(tiny_model_dir, pairs):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    before, after = vb.prompt_layout(tok)
    assert before.count("<|image_pad|>") == 1 and "system" not in before  # the tiny template has no system turn
    assert after.endswith("<|im_start|>assistant\n")

    class NoTemplate:
        def apply_chat_template(self, *a, **k):
            raise ValueError("no chat template")

    assert vb.prompt_layout(NoTemplate()) == tuple(vb.QWEN_VL_PROMPT.split("{prompt}"))
    r = _req(next(p for p in pairs if p.qry_image is not None), prompt="Say {x}.")  # braces are text
    assert vb.generate_prompt(r, "PIL", (before, after))["prompt"] == before + "Say {x}." + after


def test_vllm_chat_and_generate_inputs(pairs):
    p = next(p for p in pairs if p.qry_image is not None)
    r = _req(p, prompt="Write a caption.")
    conv = vb.chat_conversation(r)
    assert len(conv) == 1 and conv[0]["role"] == "user"
    img, text = conv[0]["content"]
    assert text == {"type": "text", "text": "Write a caption."}
    url = img["image_url"]["url"]
    assert img["type"] == "image_url" and url.startswith("data:image/png;base64,")
    assert base64.b64decode(url.split(",", 1)[1]) == p.qry_image.bytes
    g = vb.generate_prompt(r, image="PIL")
    assert g["multi_modal_data"] == {"image": "PIL"}
    assert g["prompt"].count("<|image_pad|>") == 1 and g["prompt"].endswith("<|im_start|>assistant\n")
    assert "Write a caption." in g["prompt"]


def test_data_url_reencodes_unusual_formats():
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (4, 4), (255, 0, 0)).save(buf, format="BMP")
    url = data_url(buf.getvalue())
    assert url.startswith("data:image/png;base64,")
    Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))).verify()


@pytest.mark.skipif(HAS_VLLM, reason="checks the error shown where vLLM is not installed")
def test_vllm_backend_missing_names_alternatives():
    with pytest.raises(TeacherError, match="make vllm-venv.*--backend openai.*--backend transformers"):
        vb.VllmTeacher("m")


@pytest.mark.gpu
@pytest.mark.skipif(not (HAS_VLLM and _cuda()), reason="needs vLLM and a CUDA GPU")
def test_vllm_offline_structured_generation(tiny_model_dir, pairs):
    t = vb.VllmTeacher(str(tiny_model_dir), max_model_len=2048, gpu_memory_utilization=0.3, enforce_eager=True,
                       min_pixels=None, max_pixels=None)
    with_img = [p for p in pairs if p.qry_image is not None][:4]
    # bounded strings (the schema's maxLength) so that even random weights finish every output
    schemas = {"caption": json_schema("caption", caption_chars=48), "qa": json_schema("qa", 1, qa_chars=32)}
    reqs = [_req(p, task, seed=i, k=1, sampling=Sampling(max_tokens=128))
            for i, (p, task) in enumerate(zip(with_img, ["caption", "qa"] * 2))]
    for r in reqs:
        r.schema = schemas[r.task]
    res = t.generate(reqs)
    assert t.structured and len(res) == 4
    for r, q in zip(res, reqs):
        assert r.completion_tokens > 0 and r.prompt_tokens > 0 and r.finish_reason == "stop"
        parse_output(q.task, r.text, 1, caption_chars=48, qa_chars=32)  # every finished request parses


# -- transformers backend -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def hf_teacher(tiny_model_dir):
    from cocoa.datagen.teachers.hf import TransformersTeacher

    return TransformersTeacher(str(tiny_model_dir), device="cpu", batch_size=3)


def test_transformers_teacher_left_padded_batches_match_single_requests(hf_teacher, pairs):
    greedy = Sampling(temperature=0.0, max_tokens=8)
    with_img = [p for p in pairs if p.qry_image is not None][:3]
    # different prompt lengths -> padding inside the batch
    reqs = [_req(p, prompt="Describe." + " Be precise." * i, sampling=greedy) for i, p in enumerate(with_img)]
    assert hf_teacher.tokenizer.padding_side == "left"
    batched = hf_teacher.generate(reqs)
    alone = [hf_teacher.generate([r])[0] for r in reqs]
    assert [r.text for r in batched] == [r.text for r in alone]
    assert all(0 < r.completion_tokens <= 8 and r.prompt_tokens > 0 for r in batched)
    assert len({r.prompt_tokens for r in batched}) == 3


def test_transformers_teacher_sampling_is_seeded(hf_teacher, pairs):
    p = next(p for p in pairs if p.qry_image is not None)
    s = Sampling(temperature=1.0, top_p=1.0, max_tokens=8)
    a, b = hf_teacher.generate([_req(p, seed=7, sampling=s)]), hf_teacher.generate([_req(p, seed=7, sampling=s)])
    assert a[0].text == b[0].text
