"""The typed config system and the CLI's handling of user mistakes."""

import os
import subprocess
import sys
from typing import Any, Literal

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


class Named(Section):
    name: str = "canny"
    params: dict[str, Any] = {}


class TypedConfig(JobConfig):
    run_name: str = "run"
    version: str | None = None
    steps: int = 10
    lr: float = 1e-5
    fresh: bool = False
    zero_stage: Literal[0, 1, 2, 3] = 2
    tags: list[str] = []
    entries: list[Named] = []


def test_override_values_are_typed():
    assert parse_override("a.b=1e-5") == (["a", "b"], "1e-5", "1e-5")
    assert parse_override("x=[1, 2]") == (["x"], ["1", "2"], [1, 2])
    cfg = load_config(
        TypedConfig, None, ["steps=3", "lr=1e-4", "fresh=true", "zero_stage=3", "ray.resources={gpu: 1}"]
    )
    assert (cfg.steps, cfg.lr, cfg.fresh, cfg.zero_stage, cfg.ray.resources) == (3, 1e-4, True, 3, {"gpu": 1.0})


@pytest.mark.parametrize(
    "override, field, expected",
    [
        ("version=2", "version", "2"),  # zeroconv evaluate version=2
        ("run_name=2024", "run_name", "2024"),
        ("run_name=0123", "run_name", "0123"),  # not YAML's octal 83
        ("run_name=1e-5", "run_name", "1e-5"),
        ("run_name=true", "run_name", "true"),
        ('run_name="2024"', "run_name", "2024"),  # quoted: still the string
        ("run_name='007'", "run_name", "007"),
        ("version=null", "version", None),
        ("steps=0123", "steps", 123),  # an integer field reads 0123 as a decimal integer
        ("tags=[2024, b]", "tags", ["2024", "b"]),
    ],
)
def test_field_type_decides_what_a_bare_word_means(override, field, expected):
    assert getattr(load_config(TypedConfig, None, [override]), field) == expected


def test_lists_of_sections_keep_yaml_typing_where_the_field_takes_anything():
    cfg = load_config(TypedConfig, None, ["entries=[{name: 2024, params: {low: 50, high: '7', on: true}}]"])
    assert cfg.entries[0].name == "2024"
    assert cfg.entries[0].params == {"low": 50, "high": "7", "on": True}


def test_stage_configs_take_numeric_looking_strings():
    from pipelines.annotate import AnnotateConfig
    from pipelines.evaluate import EvaluateConfig
    from pipelines.train_config import TrainConfig

    assert load_config(EvaluateConfig, None, ["version=2"]).version == "2"
    assert load_config(TrainConfig, None, ["run_name=2024"]).run_name == "2024"
    annotate = load_config(AnnotateConfig, None, ["input=2024", "annotators=[{name: canny}]"])
    assert (annotate.input, annotate.annotators[0].name) == ("2024", "canny")


def test_home_is_expanded_in_paths(tmp_path):
    from pipelines.train_config import TrainConfig

    home = os.path.expanduser("~")
    cfg = load_config(TrainConfig, None, ["base_model.source=~/sd15", "work_dir=~/runs"])
    assert (cfg.base_model.source, cfg.work_dir) == (f"{home}/sd15", f"{home}/runs")
    f = tmp_path / "c.yaml"
    f.write_text("base_model:\n  source: ~/sd15\n")
    assert load_config(TrainConfig, f).base_model.source == f"{home}/sd15"
    assert load_config(TrainConfig, None, ["run_name=~x"]).run_name == "~x"  # not a path field


def test_home_is_expanded_in_every_stage_path_field():
    from pipelines.annotate import AnnotateConfig
    from pipelines.evaluate import EvaluateConfig
    from pipelines.precompute import PrecomputeConfig
    from pipelines.train_config import TrainConfig

    home = os.path.expanduser("~")
    fields = {
        AnnotateConfig: ["input", "output"],
        PrecomputeConfig: ["data", "output"],
        TrainConfig: ["data", "storage_path"],
        EvaluateConfig: ["data"],
    }
    for cls, names in fields.items():
        cfg = load_config(cls, None, [f"{name}=~/{name}" for name in names])
        assert [getattr(cfg, name) for name in names] == [f"{home}/{name}" for name in names], cls.__name__
        assert getattr(load_config(cls, None, [f"{names[0]}=s3://b/~x"]), names[0]) == "s3://b/~x"


def test_cli_help_lists_every_stage(capsys):
    assert main([]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in STAGES)


def test_cli_stage_help_and_bad_override_without_traceback():
    run = [sys.executable, "-m", "pipelines.cli"]
    helped = subprocess.run(run + ["demo", "--help"], capture_output=True, text=True, timeout=120)
    assert helped.returncode == 0 and "fields" in helped.stdout and "work_dir" in helped.stdout
    # A section's defaults are the job's own: the demo runs on 'shapes' (BaseModelConfig alone says 'tiny').
    assert "  base_model.source='shapes' " in helped.stdout
    bad = subprocess.run(run + ["demo", "no_such_field=1"], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2
    assert "no_such_field: unknown field" in bad.stderr and "Traceback" not in bad.stderr


@pytest.mark.parametrize("stage", ["evaluate", "promote", "serve", "train"])
def test_s3_work_dir_without_tracking_server_is_refused_at_start(
    stage, tmp_path, monkeypatch, capsys, fill50k_parquet
):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    extra = [f"data={fill50k_parquet}"] if stage in ("train", "evaluate") else []
    assert main([stage, "work_dir=s3://bucket/work", *extra]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "work_dir s3://bucket/work is not on this machine" in err
    assert "set mlflow.tracking_uri" in err
    assert list(tmp_path.iterdir()) == []  # no local "s3:" folder, no empty SQLite registry


def test_pipeline_refuses_s3_work_dir_before_annotating(tmp_path, monkeypatch):
    from pipelines.pipeline import PipelineConfig, run_pipeline

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    config = load_config(
        PipelineConfig, None, ["work_dir=s3://bucket/work", f"annotate.input={tmp_path}/nothing-here-yet"]
    )
    with pytest.raises(ConfigError, match="work_dir s3://bucket/work is not on this machine"):
        run_pipeline(config)  # the old code failed on the input (or, given one, only after annotating it)


def test_promote_outside_the_training_folder_names_the_registry_and_creates_none(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    assert main(["promote", "my-model"]) == 2
    err = capsys.readouterr().err
    assert f"no MLflow registry at {tmp_path}/runs/mlflow.db" in err and err.count("\n") == 1
    assert not (tmp_path / "runs").exists()


def test_a_relative_base_model_dir_still_loads_after_the_working_directory_changes(
    tmp_path, monkeypatch, tiny_base_dir
):
    """Ray workers run in other directories than the job that parsed the config: ``base_model.source=./my-base``
    must name the same directory there (the config makes it absolute), not "does not exist"."""
    import shutil

    from model.base import resolve_base_dir
    from pipelines.train_config import TrainConfig

    shutil.copytree(tiny_base_dir, tmp_path / "job" / "my-base")
    monkeypatch.chdir(tmp_path / "job")
    config = load_config(TrainConfig, overrides=["base_model.source=./my-base", "data=annotated"])
    (tmp_path / "worker").mkdir()
    monkeypatch.chdir(tmp_path / "worker")  # as a Ray worker
    assert resolve_base_dir(config.base_model.source) == tmp_path / "job" / "my-base"
    # Names that are not a local diffusers directory stay as typed.
    for source in ("tiny", "shapes", "s3://bucket/base", "org/name"):
        assert (
            load_config(TrainConfig, overrides=[f"base_model.source={source}", "data=x"]).base_model.source == source
        )
