"""The typed config system and the CLI's handling of user mistakes."""

import subprocess
import sys
from typing import Literal

import pytest
from pydantic import Field

from pipelines.cli import STAGES, main
from pipelines.common.config import ConfigError, JobConfig, Section, flatten, load_config, parse_override


class Optim(Section):
    lr: float = Field(default=1e-5, description="learning rate")
    policy: Literal["locked", "unlock_decoder"] = Field(default="locked", description="what trains")


class ToyConfig(JobConfig):
    steps: int = Field(default=10, description="steps")
    optim: Optim = Optim()


def test_defaults_yaml_and_overrides(tmp_path):
    assert load_config(ToyConfig).optim.lr == 1e-5
    f = tmp_path / "c.yaml"
    f.write_text("steps: 3\noptim:\n  lr: 2.0e-5\n")
    cfg = load_config(ToyConfig, f, ["optim.lr=1e-4", "optim.policy=unlock_decoder", "storage.s3_region=eu-west-1"])
    assert (cfg.steps, cfg.optim.lr, cfg.optim.policy, cfg.storage.s3_region) == (
        3,
        1e-4,
        "unlock_decoder",
        "eu-west-1",
    )
    assert flatten(cfg)["optim.lr"] == 1e-4


@pytest.mark.parametrize(
    "override, message",
    [
        (["optim.policy=frozen"], "optim.policy: 'frozen' is not allowed; choose one of 'locked' or 'unlock_decoder'"),
        (["optim.lrr=1"], "optim.lrr: unknown field"),
        (["steps=many"], "steps: Input should be a valid integer"),
        (["steps"], "not of the form key=value"),
    ],
)
def test_errors_name_the_field(override, message):
    with pytest.raises(ConfigError) as err:
        load_config(ToyConfig, None, override)
    assert message in str(err.value)


def test_missing_and_invalid_yaml(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(ToyConfig, tmp_path / "nope.yaml")
    (tmp_path / "bad.yaml").write_text("steps: [1,\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(ToyConfig, tmp_path / "bad.yaml")


def test_override_values_are_typed():
    assert parse_override("a.b=1e-5") == (["a", "b"], 1e-5)
    assert parse_override("x=true") == (["x"], True)
    assert parse_override("x=[1, 2]") == (["x"], [1, 2])


def test_cli_help_lists_every_stage(capsys):
    assert main([]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in STAGES)


def test_cli_stage_help_and_bad_override_without_traceback():
    run = [sys.executable, "-m", "pipelines.cli"]
    helped = subprocess.run(run + ["demo", "--help"], capture_output=True, text=True, timeout=120)
    assert helped.returncode == 0 and "fields" in helped.stdout and "work_dir" in helped.stdout
    bad = subprocess.run(run + ["demo", "no_such_field=1"], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2
    assert "no_such_field: unknown field" in bad.stderr and "Traceback" not in bad.stderr
