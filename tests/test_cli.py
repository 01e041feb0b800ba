"""The CLI and the MLproject come from one table of stages and their config fields."""

import dataclasses
import typing
from pathlib import Path

import click
import yaml
from click.testing import CliRunner

from realign.cli import main
from realign.stages import stage_table
from realign.stages.base import Stage
from realign.tracking.models import REGISTERED_STAGES

MLPROJECT = Path(__file__).resolve().parents[1] / "MLproject"


def _field(config: type, key: str):
    """The dataclass field of a dotted key (eval.judge), or None."""
    outer, _, inner = key.partition(".")
    fields = {spec.name: spec for spec in dataclasses.fields(config)}
    if outer not in fields:
        return None
    if not inner:
        return fields[outer]
    nested = typing.get_type_hints(config)[outer]
    return _field(nested, inner) if dataclasses.is_dataclass(nested) else None


def _default(spec):
    if spec.default is not dataclasses.MISSING:
        return spec.default
    return spec.default_factory()


def test_every_stage_is_a_cli_command_with_one_option_per_documented_field():
    stages = stage_table()
    context = click.Context(main)
    commands = {name: main.get_command(context, name) for name in main.list_commands(context)}
    assert set(stages) <= set(commands) and "pipeline" in commands
    for name, stage in stages.items():
        options = {opt for param in commands[name].params for opt in param.opts}
        for spec in dataclasses.fields(stage.config):
            if "help" in spec.metadata:
                assert f"--{spec.name.replace('_', '-')}" in options, (name, spec.name)
        for short in stage.shortcuts:
            assert f"--{short.replace('_', '-')}" in options
        assert commands[name].help == stage.summary


def test_every_mlproject_parameter_is_its_stages_config_key_with_the_same_default():
    """An MLproject default is the config field's own default, or "" (= keep the recipe's value), or absent
    (a required input); every entry but main and search is a stage of the table."""
    project = yaml.safe_load(MLPROJECT.read_text())
    stages = stage_table()
    for entry, spec in project["entry_points"].items():
        if entry == "main":
            assert "realign pipeline" in spec["command"]
            continue
        if entry == "search":  # not a stage: its parameters are the search command's own options
            options = {opt for param in main.get_command(click.Context(main), "search").params for opt in param.opts}
            for parameter in spec["parameters"]:
                assert f"--{parameter.replace('_', '-')}" in options and f"{{{parameter}}}" in spec["command"]
            continue
        stage: Stage = stages.get(entry)
        for parameter, declared in spec.get("parameters", {}).items():
            if parameter == "register":  # the command's own option, not a config key: off when empty
                assert entry in REGISTERED_STAGES and declared["default"] == "" and "--register {register}" in spec["command"]
                continue
            key = stage.shortcuts.get(parameter, parameter)
            if key == "model":
                assert declared.get("default") == "smollm2-135m", entry
                continue
            field = _field(stage.config, key)
            assert field is not None, f"{entry}: MLproject parameter {parameter} is no config key of the stage"
            assert f"{{{parameter}}}" in spec["command"], f"{entry}: {parameter} is declared but not passed"
            if "default" not in declared or declared["default"] == "":
                continue
            want, got = _default(field), declared["default"]
            same = float(want) == float(got) if isinstance(want, (int, float)) else str(want) == str(got)
            assert same, f"{entry}.{parameter}: MLproject default {got!r}, config default {want!r}"


def test_a_stage_added_in_a_test_is_one_declaration(tracking_store):
    """One Stage entry: it is a CLI command with its options, runs, and fails FAILED with one line."""
    import mlflow

    from realign import tracking
    from realign.cli import stage_command
    from realign.config import option, resolve_stage_config
    from realign.errors import RealignError

    @dataclasses.dataclass
    class EchoConfig:
        word: str = option("hello", "what to log")
        experiment: str = option("", "experiment")

        def validate(self):
            if self.word == "bad":
                raise RealignError("word=bad is not allowed", "pass another --word")

    def body(run, cfg):
        run.set_name(f"echo/{cfg.word}")
        run.log_metrics({"letters": len(cfg.word)})

    echo = Stage("echo", EchoConfig, lambda overrides: resolve_stage_config(EchoConfig, "echo", "", overrides), body,
                 summary="Log a word.")
    with stage_table().temporarily("echo", echo):
        command = stage_command(echo)
        assert [p.opts[0] for p in command.params] == ["--word", "--experiment", "--dry-run"]
        listed = CliRunner().invoke(main, ["--help"], catch_exceptions=False).output
        assert "echo" in listed and "Log a word." in listed
        dry = CliRunner().invoke(main, ["echo", "--dry-run", "--word", "dry"], catch_exceptions=False)
        assert dry.exit_code == 0 and "word: dry" in dry.output, dry.output
        assert not mlflow.search_runs(search_all_experiments=True, output_format="list"), "a dry run makes no run"
        good = CliRunner().invoke(main, ["echo", "--word", "realign"], catch_exceptions=False)
        assert good.exit_code == 0, good.output
        run = mlflow.get_run(good.output.strip().split()[-1])
        assert run.data.metrics["letters"] == 7 and run.data.tags[tracking.TAG_STAGE] == "echo"
        assert run.data.params["word"] == "realign" and run.data.tags[tracking.TAG_COMPLETE] == "true"
        bad = CliRunner().invoke(main, ["echo", "--word", "bad"], catch_exceptions=False)
        lines = [line for line in bad.output.splitlines() if line.strip()]
        assert bad.exit_code == 2 and lines == ["error: word=bad is not allowed — pass another --word"]
        failed = [r for r in mlflow.search_runs(search_all_experiments=True, output_format="list")
                  if r.info.status == "FAILED"]
        assert len(failed) == 1 and failed[0].data.tags[tracking.TAG_ERROR].startswith("word=bad")
        # Under the pipeline: a step of the new stage, and a second call reuses it.
        import yaml as yaml_module

        from realign.stages.pipeline import run_pipeline

        spec = Path(tracking_store.removeprefix("sqlite:///")).parent / "echo.yaml"
        spec.write_text(yaml_module.safe_dump({"steps": {"say": {"stage": "echo", "word": "twice"}}}))
        first = run_pipeline({"name": str(spec)})
        second = run_pipeline({"name": str(spec)})
        said = [r for r in mlflow.search_runs(search_all_experiments=True, output_format="list")
                if r.data.tags.get("mlflow.runName") == "echo/twice"]
        assert len(said) == 1 and first != second
