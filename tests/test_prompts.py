"""Prompt library (sandboxed Jinja) and output schemas."""

import json

import pytest

from cocoa.datagen.schemas import OutputError, json_schema, parse_output, schema_hash
from cocoa.prompts import PromptError, PromptLibrary, clean_text, image_kind

CTX = dict(dataset="DocVQA", kind="document", task="qa", qry="What is the date?", pos_text="1998",
           role="query", k=4, schema="{}")


def test_builtin_templates_render_every_task_and_kind():
    lib = PromptLibrary()
    seen = set()
    for task in ("caption", "qa"):
        for kind in ("natural", "document", "unknown-kind"):
            t = lib.select(task, kind)
            seen.add(t.name)
            text = lib.render(t, **{**CTX, "task": task, "kind": kind}).text
            assert "DocVQA" in text and "What is the date?" in text and "JSON" in text
            if task == "qa":
                assert "Write 4 different question-answer pairs" in text
    assert seen == {"caption_natural", "caption_document", "qa_natural", "qa_document"}
    # document variants ask for text and numbers; natural ones for objects, counts and relations
    assert "numbers" in lib.get("caption_document").source and "count" in lib.get("caption_natural").source
    # unknown kinds fall back to the natural variant
    assert lib.select("caption", "unknown-kind").name == "caption_natural"


def test_hint_block_is_dropped_without_record_text():
    lib = PromptLibrary()
    text = lib.render("caption_natural", **{**CTX, "qry": "", "pos_text": ""}).text
    assert "hint" not in text.split("\n")[2] and "- query" not in text


def test_sandbox_refuses_python_internals(tmp_path):
    # refused when the library loads (before any output is written), not when the line first renders
    (tmp_path / "caption_natural.j2").write_text("{{ ''.__class__.__mro__ }}")
    with pytest.raises(PromptError, match="sandbox|unsafe"):
        PromptLibrary(tmp_path)
    (tmp_path / "caption_natural.j2").write_text("{{ cycler.__init__.__globals__ }}")
    with pytest.raises(PromptError):
        PromptLibrary(tmp_path)


def test_strict_undefined_names_the_variable(tmp_path):
    (tmp_path / "qa_natural.j2").write_text("Describe {{ datset }}")
    with pytest.raises(PromptError, match="datset"):
        PromptLibrary(tmp_path).render("qa_natural", **CTX)


def test_user_directory_overrides_and_adds_with_own_hash(tmp_path):
    builtin = PromptLibrary().get("caption_natural")
    (tmp_path / "caption_natural.j2").write_text("Caption this {{ dataset }} image as JSON.")
    (tmp_path / "caption_chart.j2").write_text("Chart from {{ dataset }}: read every number. JSON please.")
    lib = PromptLibrary(tmp_path)
    over = lib.select("caption", "natural")
    assert over.origin == str(tmp_path) and over.hash != builtin.hash
    assert lib.render(over, **CTX).text == "Caption this DocVQA image as JSON."
    assert lib.select("caption", "chart").name == "caption_chart"
    assert lib.select("qa", "natural").origin == "builtin"  # not overridden


def test_hash_covers_included_templates(tmp_path):
    (tmp_path / "_rules.j2").write_text("Rule A.")
    (tmp_path / "caption_natural.j2").write_text("{% include '_rules.j2' %} Caption {{ dataset }}.")
    h1 = PromptLibrary(tmp_path).get("caption_natural").hash
    (tmp_path / "_rules.j2").write_text("Rule B.")
    lib = PromptLibrary(tmp_path)
    assert lib.get("caption_natural").hash != h1
    assert lib.render("caption_natural", **CTX).text == "Rule B. Caption DocVQA."


def test_bad_user_templates_fail_early_with_the_file(tmp_path):
    (tmp_path / "qa_natural.j2").write_text("{% if %}")
    with pytest.raises(PromptError, match="qa_natural.j2.*syntax error"):
        PromptLibrary(tmp_path)
    with pytest.raises(PromptError, match="no such directory"):
        PromptLibrary(tmp_path / "missing")


def test_image_kind_and_clean_text():
    assert image_kind("DocVQA") == image_kind("ChartQA") == image_kind("InfographicsVQA") == "document"
    assert image_kind("MSCOCO_i2t") == image_kind("SceneVQA") == image_kind("ImageNet_1K") == "natural"
    assert image_kind("MSCOCO", {"image_kind": "document"}) == "document"
    assert clean_text("<|image_1|>\nRepresent   the image") == "Represent the image"


# -- output schemas ---------------------------------------------------------------------------------
def test_parse_valid_outputs_and_fences():
    assert parse_output("caption", '{"caption": "  a red\\n cube "}').caption == "a red cube"
    out = parse_output("qa", '```json\n{"qa": [{"question": "How many?", "answer": "2"}]}\n```', k=3)
    assert [(p.question, p.answer) for p in out.qa] == [("How many?", "2")]


@pytest.mark.parametrize("raw,reason", [
    ("", "empty"),
    ("PPPP garbage", "invalid_json"),
    ('{"caption": ""}', "schema"),
    ('{"caption": "x", "extra": 1}', "schema"),
    ('["caption"]', "schema"),
])
def test_invalid_captions(raw, reason):
    with pytest.raises(OutputError) as e:
        parse_output("caption", raw)
    assert e.value.reason == reason


def test_invalid_qa():
    pairs = [{"question": f"q{i}?", "answer": "a"} for i in range(4)]
    with pytest.raises(OutputError, match="at most 3"):
        parse_output("qa", json.dumps({"qa": pairs}), k=3)
    with pytest.raises(OutputError, match="repeated"):
        parse_output("qa", json.dumps({"qa": [pairs[0], pairs[0]]}), k=3)
    with pytest.raises(OutputError, match="at least 1"):
        parse_output("qa", '{"qa": []}', k=3)


def test_json_schema_is_strict_and_hashed():
    s = json_schema("qa", 5)
    assert s["additionalProperties"] is False and s["properties"]["qa"]["maxItems"] == 5
    assert s["$defs"]["QAPair"]["additionalProperties"] is False
    assert schema_hash("qa", 5) != schema_hash("qa", 3) != schema_hash("caption")


def test_a_prompts_file_linking_outside_the_directory_is_refused_unread(tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("top secret {{ dataset }}")
    d = tmp_path / "prompts"
    d.mkdir()
    (d / "caption_natural.j2").symlink_to(secret)
    with pytest.raises(PromptError, match="outside") as e:
        PromptLibrary(d)
    assert "top secret" not in str(e.value) and "\n" not in str(e.value)
    # a link that stays inside the directory is fine
    (d / "caption_natural.j2").unlink()
    (d / "real.j2").write_text("{{ dataset }} caption, answer as JSON")
    (d / "caption_natural.j2").symlink_to(d / "real.j2")
    assert "DocVQA" in PromptLibrary(d).render("caption_natural", **CTX).text
