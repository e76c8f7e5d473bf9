"""The ``capt`` command line: value parsing, exit codes, and what each subcommand passes on."""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import nbformat
import pytest

from capt_lib.runs.cli import EXIT_FAILED, EXIT_OK, EXIT_USAGE, main, parse_parameter_value

KERNEL = "python3"


def write_notebook(path: Path, parameters: str, cells: list[str]) -> Path:
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": KERNEL, "display_name": "Python 3", "language": "python"}
    parameters_cell = nbformat.v4.new_code_cell(parameters)
    parameters_cell.metadata["tags"] = ["parameters"]
    nb.cells = [nbformat.v4.new_markdown_cell("# CLI notebook"), parameters_cell]
    nb.cells += [nbformat.v4.new_code_cell(source) for source in cells]
    nbformat.write(nb, path)
    return path


RECORD_INPUTS = """import json, pathlib
pathlib.Path(output_dir, "result.json").write_text(json.dumps({"dataset": dataset, "seed": seed, "lr": lr, "tag": tag}))"""

PARAMETERS = "dataset = 'fashion_mnist'\nseed = 1\nlr = 0.1\ntag = 'none'\noutput_dir = None"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("4", 4),
        ("0.5", 0.5),
        ("1e-3", 0.001),
        ("-2", -2),
        ("true", True),
        ("False", False),
        ("null", None),
        ("None", None),
        ("fashion_mnist", "fashion_mnist"),
        ("[1, 2]", [1, 2]),
        ("2026-01-01", "2026-01-01"),
        ("nan", "nan"),
        ("a: b: c", "a: b: c"),
        ("", ""),
    ],
)
def test_parameter_values_parse_as_yaml(text, expected):
    value = parse_parameter_value(text)

    assert value == expected
    assert type(value) is type(expected)


@pytest.mark.slow
def test_run_uses_notebook_defaults(tmp_path, capsys):
    notebook = write_notebook(tmp_path / "cli.ipynb", PARAMETERS, [RECORD_INPUTS])

    code = main(["run", str(notebook), "-p", "lr", "1e-2", "-p", "tag", "x",
                 "--runs-dir", str(tmp_path / "runs"), "--kernel", KERNEL])

    assert code == EXIT_OK
    result = json.loads((tmp_path / "runs" / "cli" / "fashion_mnist" / "seed1" / "result.json").read_text())
    assert result == {"dataset": "fashion_mnist", "seed": 1, "lr": 0.01, "tag": "x"}
    assert "ok" in capsys.readouterr().out


@pytest.mark.slow
def test_run_failing_notebook_exits_1(tmp_path, capsys):
    notebook = write_notebook(tmp_path / "bad.ipynb", PARAMETERS, ["raise RuntimeError('no bank for ' + dataset)"])

    code = main(["run", str(notebook), "--seed", "4", "--runs-dir", str(tmp_path / "runs"), "--kernel", KERNEL])

    assert code == EXIT_FAILED
    stderr = capsys.readouterr().err
    assert "RuntimeError: no bank for fashion_mnist" in stderr
    assert "cell 2" in stderr


def test_run_undeclared_parameter_exits_2(tmp_path, capsys):
    notebook = write_notebook(tmp_path / "cli.ipynb", PARAMETERS, [RECORD_INPUTS])

    code = main(["run", str(notebook), "-p", "epochs", "3", "--runs-dir", str(tmp_path / "runs"), "--kernel", KERNEL])

    assert code == EXIT_USAGE
    assert "['epochs']" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


def test_run_needs_dataset_parameter(tmp_path, capsys):
    notebook = write_notebook(tmp_path / "plain.ipynb", "seed = 1\noutput_dir = None", ["pass"])

    code = main(["run", str(notebook), "--runs-dir", str(tmp_path / "runs"), "--kernel", KERNEL])

    assert code == EXIT_USAGE
    assert "does not declare the parameter 'dataset'" in capsys.readouterr().err


def test_run_missing_notebook_exits_2(tmp_path, capsys):
    code = main(["run", str(tmp_path / "missing.ipynb")])

    assert code == EXIT_USAGE
    assert "missing.ipynb does not exist" in capsys.readouterr().err


def test_pretrain_passes_recipe_and_seed(tmp_path, monkeypatch, capsys):
    calls = []

    def load_miniclip(recipe="default", seed=0, cache_dir=None, device="cpu"):
        calls.append((recipe, seed, cache_dir, device))
        return types.SimpleNamespace(pretrained=f"miniclip-{recipe}-seed{seed}", key="0123abcd")

    fake_module = types.ModuleType("capt_lib.backbones.miniclip")
    fake_module.load_miniclip = load_miniclip
    monkeypatch.setitem(sys.modules, "capt_lib.backbones.miniclip", fake_module)

    code = main(["pretrain", "--recipe", "smoke", "--seed", "3", "--cache-dir", str(tmp_path)])

    assert code == EXIT_OK
    assert calls == [("smoke", 3, tmp_path, "cpu")]
    assert "miniclip-smoke-seed3" in capsys.readouterr().out


def test_book_outside_repository_exits_2(tmp_path, capsys):
    code = main(["book", "--repo-root", str(tmp_path), "--runs-dir", str(tmp_path / "runs")])

    assert code == EXIT_USAGE
    assert "_toc.yml does not exist" in capsys.readouterr().err


def test_unknown_subcommand_exits_2(capsys):
    with pytest.raises(SystemExit) as excinfo:
        main(["train"])

    assert excinfo.value.code == EXIT_USAGE
