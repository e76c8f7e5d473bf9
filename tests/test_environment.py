"""pyproject.toml, environment.yml and the Makefile agree, and the Makefile and .ci/run call the expected commands."""

from __future__ import annotations

import os
import re
import shutil
import stat
import subprocess
import tomllib
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name

REPO_ROOT = Path(__file__).resolve().parents[1]


def pyproject_requirements() -> dict[str, Requirement]:
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
    lines = project["dependencies"] + project["optional-dependencies"]["test"]
    return {canonicalize_name(Requirement(line).name): Requirement(line) for line in lines}


def conda_environment() -> dict:
    return yaml.safe_load((REPO_ROOT / "environment.yml").read_text())


def conda_pip_lines() -> list[str]:
    sections = [entry["pip"] for entry in conda_environment()["dependencies"] if isinstance(entry, dict)]
    assert len(sections) == 1, "environment.yml must have exactly one pip section"
    return sections[0]


def test_conda_pip_packages_match_pyproject():
    expected = pyproject_requirements()
    listed = {
        canonicalize_name(Requirement(line).name): Requirement(line)
        for line in conda_pip_lines()
        if not line.startswith("-")
    }

    assert sorted(set(expected) - set(listed)) == [], "packages of pyproject.toml missing from environment.yml"
    assert sorted(set(listed) - set(expected)) == [], "packages of environment.yml missing from pyproject.toml"
    for name, requirement in expected.items():
        assert listed[name].specifier == requirement.specifier, (
            f"{name}: environment.yml pins {listed[name].specifier}, pyproject.toml pins {requirement.specifier}"
        )


def test_conda_installs_project_editable():
    assert "-e ." in conda_pip_lines()


def test_conda_python_matches_requires_python():
    requires_python = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["requires-python"]
    python_lines = [
        entry for entry in conda_environment()["dependencies"]
        if isinstance(entry, str) and re.match(r"python\b", entry)
    ]

    assert len(python_lines) == 1
    assert SpecifierSet(python_lines[0][len("python"):]) == SpecifierSet(requires_python)


def test_makefile_torch_pins_match_pyproject():
    match = re.search(r"^TORCH_PINS := (.+)$", (REPO_ROOT / "Makefile").read_text(), flags=re.MULTILINE)
    assert match is not None, "Makefile defines no TORCH_PINS"
    pins = {canonicalize_name(Requirement(pin).name): Requirement(pin) for pin in match.group(1).split()}
    expected = pyproject_requirements()

    assert sorted(pins) == ["torch", "torchvision"]
    for name, pin in pins.items():
        assert pin.specifier == expected[name].specifier, f"{name}: Makefile pins {pin}, pyproject.toml {expected[name]}"


# The tests below run the real Makefile against stub programs that only log their
# arguments, so the environment step can be checked without installing anything.

STUB_PYTHON3 = """#!/bin/bash
echo "python3 $*" >> {log}
if [ "$1" = "-m" ] && [ "$2" = "venv" ]; then
  mkdir -p "$3/bin"
  cp {stub_dir}/python "$3/bin/python"
  cp {stub_dir}/capt "$3/bin/capt"
fi
"""

STUB_VENV_PYTHON = """#!/bin/bash
echo "python $*" >> {log}
if [ "$1" = "-m" ] && [ "$2" = "pytest" ]; then exit "${{STUB_PYTEST_EXIT:-0}}"; fi
"""

STUB_CAPT = """#!/bin/bash
echo "capt $*" >> {log}
if [ "$1" = "kernel" ]; then
  mkdir -p {venv}/share/jupyter/kernels/capt
  echo '{{}}' > {venv}/share/jupyter/kernels/capt/kernel.json
fi
"""


@pytest.fixture
def stub_project(tmp_path):
    if shutil.which("make") is None:
        pytest.skip("GNU make is not installed")
    project = tmp_path / "project"
    project.mkdir()
    shutil.copy2(REPO_ROOT / "Makefile", project / "Makefile")
    shutil.copy2(REPO_ROOT / "pyproject.toml", project / "pyproject.toml")

    stub_dir = tmp_path / "stubs"
    stub_dir.mkdir()
    log = tmp_path / "calls.log"
    log.touch()
    scripts = {
        "python3": STUB_PYTHON3.format(log=log, stub_dir=stub_dir),
        "python": STUB_VENV_PYTHON.format(log=log),
        "capt": STUB_CAPT.format(log=log, venv=project / ".venv"),
    }
    for name, text in scripts.items():
        path = stub_dir / name
        path.write_text(text)
        path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return project, stub_dir / "python3", log


def run_make(project: Path, python3: Path, target: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["make", "-C", str(project), target, f"PYTHON3={python3}"],
        capture_output=True, text=True, env={**os.environ, **env}, timeout=60,
    )


def new_calls(log: Path, seen: int) -> list[str]:
    return log.read_text().splitlines()[seen:]


def test_make_env_installs_torch_first(stub_project):
    project, python3, log = stub_project

    result = run_make(project, python3, "env")

    assert result.returncode == 0, result.stderr
    assert new_calls(log, 0) == [
        "python3 -m venv .venv",
        "python -m pip install torch==2.14.1 torchvision==0.29.1",
        "python -m pip install -e .[test]",
        "capt kernel",
    ]
    assert (project / ".venv" / ".capt-installed").is_file()


def test_make_env_skips_complete_environment(stub_project):
    project, python3, log = stub_project
    assert run_make(project, python3, "env").returncode == 0
    seen = len(log.read_text().splitlines())

    result = run_make(project, python3, "env")

    assert result.returncode == 0, result.stderr
    assert new_calls(log, seen) == []


def test_make_env_reinstalls_after_pyproject_change(stub_project):
    project, python3, log = stub_project
    assert run_make(project, python3, "env").returncode == 0
    seen = len(log.read_text().splitlines())
    stamp_time = (project / ".venv" / ".capt-installed").stat().st_mtime
    os.utime(project / "pyproject.toml", (stamp_time + 10, stamp_time + 10))

    result = run_make(project, python3, "env")

    assert result.returncode == 0, result.stderr
    assert new_calls(log, seen) == [
        "python -m pip install torch==2.14.1 torchvision==0.29.1",
        "python -m pip install -e .[test]",
        "capt kernel",
    ]


def test_make_test_fails_when_no_tests_collected(stub_project):
    project, python3, _ = stub_project

    result = run_make(project, python3, "test", STUB_PYTEST_EXIT="5")

    assert result.returncode != 0
    assert "pytest collected no tests" in result.stderr


def test_make_test_passes_pytest_success(stub_project):
    project, python3, log = stub_project

    result = run_make(project, python3, "test", STUB_PYTEST_EXIT="0")

    assert result.returncode == 0, result.stderr
    assert log.read_text().splitlines()[-1] == "python -m pytest"


@pytest.fixture
def stub_ci(tmp_path):
    """A copy of .ci/run with stub apt-get, sudo and make first on PATH."""
    project = tmp_path / "project"
    (project / ".ci").mkdir(parents=True)
    shutil.copy2(REPO_ROOT / ".ci" / "run", project / ".ci" / "run")
    stub_dir = tmp_path / "stubs"
    stub_dir.mkdir()
    log = tmp_path / "calls.log"
    scripts = {
        "apt-get": f'#!/bin/bash\necho "apt-get $*" >> {log}\n',
        "sudo": f'#!/bin/bash\necho "sudo" >> {log}\nexec "$@"\n',
        "make": f'#!/bin/bash\necho "make $* in $PWD" >> {log}\nexit "${{STUB_MAKE_EXIT:-0}}"\n',
    }
    for name, text in scripts.items():
        path = stub_dir / name
        path.write_text(text)
        path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return project, stub_dir, log


def run_ci(project: Path, stub_dir: Path, **env: str) -> subprocess.CompletedProcess:
    path = f"{stub_dir}{os.pathsep}{os.environ['PATH']}"
    return subprocess.run(
        ["bash", str(project / ".ci" / "run")],
        capture_output=True, text=True, env={**os.environ, "PATH": path, **env}, timeout=60,
    )


def test_ci_installs_dataset_then_runs_make_test(stub_ci):
    project, stub_dir, log = stub_ci

    result = run_ci(project, stub_dir)

    assert result.returncode == 0, result.stderr
    calls = [line for line in log.read_text().splitlines() if line != "sudo"]
    assert calls == [
        "apt-get update",
        "apt-get install -y dataset-fashion-mnist",
        f"make test in {project}",
    ]
    assert re.search(r"==> make test took \d+ s", result.stdout)


def test_ci_fails_when_make_test_fails(stub_ci):
    project, stub_dir, _ = stub_ci

    result = run_ci(project, stub_dir, STUB_MAKE_EXIT="2")

    assert result.returncode != 0
    assert "==> make test failed after" in result.stderr
