"""Every command in the README and docs/ is run here, the way its kind allows in seconds.

- `realign ...` (also behind `accelerate launch -m realign.cli` and inside `mlflow run`): run with `--dry-run`,
  which resolves and checks every option as the real run does (recipe, model preset, values, choices) and starts
  nothing. `<placeholders>` become a run id, `...` is dropped. The stages' real runs are the other tests.
- `mlflow run . -e <entry> -P k=v`: MLflow's own project loader turns it into the command it would execute (declared
  parameters checked, undeclared ones appended), and that command is dry-run.
- `mlflow ui` / `mlflow server`: started as written (on a free port, paths under a temp dir) until /health answers.
- `python bench/<script>.py`: its `--help` (a bench's full run takes minutes to hours; bench/ is where it is run).
- `bash scripts/setup.sh ...`: CI runs the README's test command verbatim (.ci/run); checked to be the same line.

A command of any other kind fails the test until it is given a way to run here, or named in NOT_RUN with why.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from conftest import free_port

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
RUN_ID = "0123456789abcdef0123456789abcdef"

# Lines of a shell block that run nothing themselves, or that need what a test machine must not do.
NOT_RUN = {
    "source": "activates the venv the tests already run in",
    "export": "sets environment variables for the commands after it",
    "python3 -m venv /tmp/mergekit-venv": "a second venv with its own torch, for the mergekit comparison "
                                          "(bench/fuse_memory.py documents it; a test must not install a torch)",
    "/tmp/mergekit-venv/bin/pip": "the same second venv",
    ".venv/bin/python -m pytest": "this test suite",
    "apt-get install": "installs Debian packages (scripts/setup.sh --test installs what the tests need)",
    ".venv/bin/pip install": "installs Python packages (scripts/setup.sh --test installs the test extras)",
    "pip install": "installs Python packages (scripts/setup.sh --test installs the test extras)",
    "bash scripts/server.sh": "a server in the foreground: tests/test_ray_executor.py starts it as written, on free "
                              "ports",
    "ray start": "a node of a multi-node Ray cluster; the tests use a cluster of one machine",
    ".venv/bin/mlflow models serve": "serves a registered model in the foreground: tests/test_registry.py starts it as written, "
                           "on a free port",
}


def doc_commands() -> list[tuple[str, str, dict[str, str]]]:
    """(where, command, environment) for every command of every ```bash block: continuation lines joined, `&&`
    chains split; the environment is what the block's `export` lines before it set."""
    found = []
    for path in DOCS:
        text = path.read_text(encoding="utf-8")
        for block in re.findall(r"```(?:bash|sh|shell)\n(.*?)```", text, re.S):
            exported: dict[str, str] = {}
            for line in block.replace("\\\n", " ").splitlines():
                line = line.strip()
                if not line or line.startswith("#"):
                    continue
                for command in re.split(r"\s&&\s", line):
                    found.append((f"{path.relative_to(ROOT)}: {command[:60]}", command.strip(), dict(exported)))
                    if command.startswith("export "):
                        exported.update(word.split("=", 1) for word in words(command)[1:])
        if path.name == "errors.md":
            continue  # its commands are bad inputs on purpose; tests/test_bad_input.py runs each
        prose = re.sub(r"```.*?```", "", text, flags=re.S)
        for span in re.findall(r"`([^`\n]+)`", prose):  # a command quoted in a sentence is a command too
            if INLINE_COMMAND.match(span):
                found.append((f"{path.relative_to(ROOT)}: `{span[:60]}`", span, {}))
    return found


INLINE_COMMAND = re.compile(r"(\.venv/bin/)?(realign|mlflow (run|ui|server)|accelerate launch|python)\s")


def words(command: str) -> list[str]:
    """The command's words, comments dropped, `<placeholder>` → a run id, `...` dropped."""
    command = re.sub(r"<[^>]+>", RUN_ID, command)
    return [word for word in shlex.split(command, comments=True) if word != "..."]


def _realign_dry_run(args: list[str], cwd: Path, env: dict[str, str]) -> None:
    from click.testing import CliRunner

    from realign.cli import main

    assert args, "no realign subcommand"
    for word in args:  # "your own experiment file": a copy of the default one
        if word.endswith((".yaml", ".yml")) and not (ROOT / "conf" / "experiments" / word).exists():
            shutil.copyfile(ROOT / "conf" / "experiments" / "default.yaml", cwd / word)
    env = {**env, "MLFLOW_TRACKING_URI": f"sqlite:///{cwd / 'unused.db'}", "MLFLOW_RUN_ID": None}
    before = Path.cwd()
    os.chdir(cwd)
    try:  # in this process: the CLI as the shell would call it, without a second of imports per command
        result = CliRunner().invoke(main, [args[0], "--dry-run", *args[1:]], env=env, catch_exceptions=False)
    finally:
        os.chdir(before)
    assert result.exit_code == 0, f"realign {' '.join(args)}:\n{result.output[-1500:]}"
    assert not (cwd / "unused.db").exists() and not (cwd / "mlruns").exists(), "a dry run must open no store"


def _mlflow_run(args: list[str], cwd: Path, env: dict[str, str]) -> None:
    from mlflow.projects import _project_spec

    assert args[0] == ".", "the docs run the project in this checkout"
    entry, params, rest = "main", {}, iter(args[1:])
    for word in rest:
        if word in ("-e", "--entry-point"):
            entry = next(rest)
        elif word in ("-P", "--param-list"):
            key, _, value = next(rest).partition("=")
            params[key] = value
        elif word in ("--env-manager", "--experiment-name", "--experiment-id"):
            next(rest)
        else:
            pytest.fail(f"mlflow run option {word!r} is not understood by this test")
    command = _project_spec.load_project(str(ROOT)).get_entry_point(entry).compute_command(params, None)
    realign_words = shlex.split(command)
    assert realign_words[0] == "realign", command
    _realign_dry_run(realign_words[1:], cwd, env)


def _mlflow_server(args: list[str], cwd: Path, env: dict[str, str]) -> None:
    args = [arg.replace("/srv/", f"{cwd}/srv/") for arg in args]
    (cwd / "srv").mkdir(exist_ok=True)
    port = free_port()
    assert "--port" not in args or args[args.index("--port") + 1] == "5000", args
    if "--port" in args:
        args[args.index("--port") + 1] = str(port)
    else:
        args += ["--port", str(port)]
    env = {**os.environ, **env}
    process = subprocess.Popen([sys.executable, "-m", "mlflow", *args], cwd=cwd, env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        for _ in range(240):
            if process.poll() is not None:
                pytest.fail(f"mlflow {' '.join(args)} exited: {process.stderr.read()[-1500:]}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1) as reply:
                    assert reply.status == 200
                    return
            except OSError:
                time.sleep(0.5)
        pytest.fail(f"mlflow {' '.join(args)} did not answer /health within 120 s")
    finally:
        process.terminate()
        process.wait(timeout=30)


def _bench_help(args: list[str], cwd: Path, env: dict[str, str]) -> None:
    script = ROOT / args[0]
    assert script.is_file(), f"{args[0]} does not exist"
    result = subprocess.run([sys.executable, str(script), "--help"], cwd=ROOT, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr[-1500:]
    for word in args[1:]:  # every option the docs pass exists
        if word.startswith("--"):
            assert word.split("=")[0] in result.stdout, f"{args[0]} has no option {word}"


def _setup(args: list[str], cwd: Path, env: dict[str, str]) -> None:
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    assert f"bash scripts/setup.sh {' '.join(args)}".strip() in ci or args == [], ci
    assert "bash scripts/setup.sh --test && .venv/bin/python -m pytest -q" in ci


def runner_of(command: str):
    """The way this test runs `command`, or the NOT_RUN reason."""
    for prefix, why in NOT_RUN.items():
        if command.startswith(prefix):
            return None, why
    parts = words(command)
    program = Path(parts[0]).name
    if program == "realign":
        return _realign_dry_run, parts[1:]
    if program == "accelerate" and "realign.cli" in parts:
        return _realign_dry_run, parts[parts.index("realign.cli") + 1:]
    if program == "mlflow" and parts[1] == "run":
        return _mlflow_run, parts[2:]
    if program == "mlflow" and parts[1] in ("ui", "server"):
        return _mlflow_server, parts[1:]
    if program == "python" and parts[1].startswith("bench/"):
        return _bench_help, parts[1:]
    if parts[:2] == ["bash", "scripts/setup.sh"]:
        return _setup, parts[2:]
    pytest.fail(f"no test runs this documented command: {command}")


COMMANDS = doc_commands()


def test_the_docs_have_commands():
    assert len(COMMANDS) > 30
    assert any("realign pipeline" in command for _, command, _ in COMMANDS)


@pytest.mark.parametrize(("command", "env"), [(c, e) for _, c, e in COMMANDS], ids=[w for w, _, _ in COMMANDS])
def test_documented_command_runs(command, env, tmp_path):
    run, args = runner_of(command)
    if run is None:
        pytest.skip(args)
    run(args, tmp_path, env)
