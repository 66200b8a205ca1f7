"""Config -> CLI flags: defaults < YAML < flags; unknown keys and bad values are clear errors."""

from typing import Literal

import click
from click.testing import CliRunner
from pydantic import BaseModel, Field

from cocoa.config import Config, ConfigError, config_options


class Section(BaseModel):
    model_config = {"extra": "forbid"}
    lr: float = Field(2e-5, description="Learning rate")
    steps: int = 10


class Demo(Config):
    name: str = "run"
    mode: Literal["lora", "full"] = "lora"
    verbose: bool = False
    stages: list[int] = [1, 2, 3]
    stage1: Section = Section()


@click.command()
@config_options(Demo)
def cmd(config: Demo) -> None:
    click.echo(config.model_dump_json())


def run(*args):
    return CliRunner().invoke(cmd, list(args))


def test_defaults_yaml_and_flag_precedence(tmp_path):
    r = run()
    assert r.exit_code == 0
    assert Demo.model_validate_json(r.output) == Demo()
    y = tmp_path / "c.yaml"
    y.write_text("name: fromyaml\nstage1:\n  lr: 0.1\n  steps: 5\nmode: full\n")
    r = run("--config", str(y), "--stage1-steps", "7", "--stages", "1,3", "--verbose")
    assert r.exit_code == 0, r.output
    c = Demo.model_validate_json(r.output)
    assert (c.name, c.mode, c.stage1.lr, c.stage1.steps, c.stages, c.verbose) == ("fromyaml", "full", 0.1, 7, [1, 3], True)


def test_unknown_key_and_bad_value(tmp_path):
    y = tmp_path / "c.yaml"
    y.write_text("stage1:\n  lrr: 0.1\n")
    r = run("--config", str(y))
    assert r.exit_code == 2 and "unknown key 'stage1.lrr'" in r.output
    r = run("--stage1-steps", "x")
    assert r.exit_code == 2 and "not a valid integer" in r.output
    r = run("--mode", "half")
    assert r.exit_code == 2
    y.write_text("- a list\n")
    r = run("--config", str(y))
    assert r.exit_code == 2 and "must hold a mapping" in r.output
    r = run("--config", str(tmp_path / "missing.yaml"))
    assert r.exit_code == 2


def test_help_lists_every_field():
    r = run("--help")
    for flag in ["--name", "--mode", "--verbose / --no-verbose", "--stages", "--stage1-lr", "--stage1-steps", "--config"]:
        assert flag in r.output
    assert "Learning rate [default: 2e-05]" in r.output


def test_build_api():
    assert Demo.build({"stage1": {"lr": 1}}, {"stage1": {"steps": 3}}).stage1.steps == 3
    try:
        Demo.build({"nope": 1})
    except ConfigError as e:
        assert "unknown key 'nope'" in str(e)
    else:
        raise AssertionError("unknown key accepted")


def test_yaml_duplicate_keys_and_bools_for_numbers_are_refused(tmp_path):
    """Audit B 14: YAML keeps the last of two equal keys silently, and pydantic takes `true` as 1."""
    import pytest

    from cocoa.config import ConfigError
    from cocoa.eval.evaluator import EvalConfig

    f = tmp_path / "c.yaml"
    f.write_text("batch_size: 4\nlabel: x\nbatch_size: 8\n")
    with pytest.raises(ConfigError, match=r"c\.yaml: key 'batch_size' is given twice \(lines 1 and 3\)"):
        EvalConfig.from_yaml(f)
    f.write_text("batch_size: true\n")
    with pytest.raises(ConfigError, match=r"c\.yaml: batch_size: true is a yes/no value, not a whole number"):
        EvalConfig.from_yaml(f)
    f.write_text("base: &b {batch_size: 4}\n")  # anchors still load; only real duplicates are refused
    with pytest.raises(ConfigError, match="unknown key 'base'"):
        EvalConfig.from_yaml(f)
    assert EvalConfig.build({"batch_size": 3, "plot": False}).batch_size == 3
