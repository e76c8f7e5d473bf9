"""Notebook execution with papermill, run records, resume, kernel registration and the book.

The tiny notebooks here run on the interpreter's own kernel ``python3``, so these tests
do not depend on the project kernel ``capt``. One test checks that kernel separately.
Tests that start a kernel are marked slow (about 1-3 s per notebook execution).
"""

from __future__ import annotations

import importlib.metadata
import json
import platform
import re
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest
from nbval.plugin import get_sanitize_patterns

from capt_lib.runs.book import (
    book_run_dir,
    build_book,
    execute_book_notebooks,
    stage_book,
    toc_entries,
    toc_notebooks,
)
from capt_lib.runs.cli import main
from capt_lib.runs.papermill_runner import (
    NotebookExecutionError,
    NotebookParameter,
    RunRecord,
    declared_parameters,
    library_source_sha256,
    read_run_record,
    register_kernel,
    run_batch,
    run_dir_for,
    run_notebook,
)
from capt_lib.utils.cache import file_sha256
from capt_lib.utils.io import atomic_write_json

KERNEL = "python3"
REPO_ROOT = Path(__file__).resolve().parents[1]

WRITE_RESULT = """import json, pathlib
pathlib.Path(output_dir).mkdir(parents=True, exist_ok=True)
pathlib.Path(output_dir, "result.json").write_text(json.dumps({"double": x * 2}))
print("double", x * 2)"""


def write_notebook(path: Path, parameters: str, cells: list[str], title: str = "# Tiny notebook") -> Path:
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": KERNEL, "display_name": "Python 3", "language": "python"}
    parameters_cell = nbformat.v4.new_code_cell(parameters)
    parameters_cell.metadata["tags"] = ["parameters"]
    nb.cells = [nbformat.v4.new_markdown_cell(title), parameters_cell]
    nb.cells += [nbformat.v4.new_code_cell(source) for source in cells]
    path.parent.mkdir(parents=True, exist_ok=True)
    nbformat.write(nb, path)
    return path


def read_result(output_dir: Path) -> dict:
    return json.loads((output_dir / "result.json").read_text())


@pytest.fixture
def doubling_notebook(tmp_path):
    return write_notebook(tmp_path / "double.ipynb", "x = 1  # the input\noutput_dir = None", [WRITE_RESULT])


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """One real run of the doubling notebook with x=5, shared by the record tests."""
    root = tmp_path_factory.mktemp("finished")
    notebook = write_notebook(root / "double.ipynb", "x = 1\noutput_dir = None", [WRITE_RESULT])
    record = run_notebook(notebook, root / "out", {"x": 5}, kernel_name=KERNEL, progress_bar=False)
    return notebook, root / "out", record


def test_declared_parameters_reads_defaults(tmp_path):
    notebook = write_notebook(tmp_path / "p.ipynb", "x = 1  # the input\nname: str = 'a'", [])

    assert declared_parameters(notebook) == {
        "x": NotebookParameter(name="x", default="1", type_name=None, help="the input"),
        "name": NotebookParameter(name="name", default="'a'", type_name="str", help=""),
    }


def test_declared_parameters_requires_tagged_cell(tmp_path):
    notebook = write_notebook(tmp_path / "untagged.ipynb", "x = 1", [])
    nb = nbformat.read(notebook, as_version=4)
    nb.cells[1].metadata["tags"] = []
    nbformat.write(nb, notebook)

    with pytest.raises(ValueError, match="untagged.ipynb has no cell tagged 'parameters'"):
        declared_parameters(notebook)


def test_declared_parameters_missing_notebook(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.ipynb"):
        declared_parameters(tmp_path / "missing.ipynb")


def test_undeclared_parameter_is_rejected(doubling_notebook, tmp_path):
    with pytest.raises(ValueError) as excinfo:
        run_notebook(doubling_notebook, tmp_path / "out", {"z": 5}, kernel_name=KERNEL)

    assert "['z']" in str(excinfo.value)
    assert "['output_dir', 'x']" in str(excinfo.value)
    assert not (tmp_path / "out").exists()


def test_unknown_kernel_is_rejected(doubling_notebook, tmp_path):
    with pytest.raises(ValueError, match="kernel 'no-such-kernel' is not registered"):
        run_notebook(doubling_notebook, tmp_path / "out", {"x": 5}, kernel_name="no-such-kernel")


@pytest.mark.slow
def test_run_writes_results_and_record(finished_run):
    notebook, output_dir, record = finished_run
    stored = json.loads((output_dir / "run.json").read_text())

    assert read_result(output_dir) == {"double": 10}
    assert stored["status"] == "ok"
    assert stored["parameters"] == {"x": 5, "output_dir": str(output_dir.resolve())}
    assert stored["notebook_sha256"] == file_sha256(notebook)
    assert stored["wall_seconds"] > 0
    assert stored["environment"]["python"] == platform.python_version()
    assert stored["environment"]["packages"]["torch"] == importlib.metadata.version("torch")
    assert RunRecord.from_json(stored) == record


@pytest.mark.slow
def test_run_saves_executed_notebook(finished_run):
    _, output_dir, _ = finished_run
    nb = nbformat.read(output_dir / "double.ipynb", as_version=4)
    printed = [output["text"] for cell in nb.cells for output in cell.get("outputs", []) if "text" in output]

    assert printed == ["double 10\n"]


@pytest.mark.slow
def test_same_run_is_reused(finished_run):
    notebook, output_dir, record = finished_run
    before = (output_dir / "run.json").read_text()

    again = run_notebook(notebook, output_dir, {"x": 5}, kernel_name=KERNEL)

    assert again.reused is True
    assert again.started_at == record.started_at
    assert (output_dir / "run.json").read_text() == before


@pytest.mark.slow
def test_changed_parameter_reruns(doubling_notebook, tmp_path):
    run_notebook(doubling_notebook, tmp_path / "out", {"x": 5}, kernel_name=KERNEL, progress_bar=False)

    record = run_notebook(doubling_notebook, tmp_path / "out", {"x": 7}, kernel_name=KERNEL, progress_bar=False)

    assert record.reused is False
    assert read_result(tmp_path / "out") == {"double": 14}


@pytest.mark.slow
def test_edited_notebook_reruns(tmp_path):
    notebook = write_notebook(tmp_path / "nb.ipynb", "x = 1\noutput_dir = None", [WRITE_RESULT])
    run_notebook(notebook, tmp_path / "out", {"x": 5}, kernel_name=KERNEL, progress_bar=False)
    write_notebook(notebook, "x = 1\noutput_dir = None", [WRITE_RESULT.replace("x * 2", "x * 3")])

    record = run_notebook(notebook, tmp_path / "out", {"x": 5}, kernel_name=KERNEL, progress_bar=False)

    assert record.reused is False
    assert read_result(tmp_path / "out") == {"double": 15}


@pytest.mark.slow
def test_force_reruns(finished_run):
    notebook, output_dir, _ = finished_run
    (output_dir / "result.json").unlink()

    record = run_notebook(notebook, output_dir, {"x": 5}, kernel_name=KERNEL, progress_bar=False, force=True)

    assert record.reused is False
    assert read_result(output_dir) == {"double": 10}


@pytest.mark.slow
def test_failing_cell_raises_with_details(tmp_path):
    notebook = write_notebook(
        tmp_path / "bad.ipynb", "x = 1", ["y = 3", "raise ValueError(f'boom {x}')", "print('never')"]
    )

    with pytest.raises(NotebookExecutionError) as excinfo:
        run_notebook(notebook, tmp_path / "out", {"x": 5}, kernel_name=KERNEL, progress_bar=False)

    error = excinfo.value
    # Source cells: 0 title, 1 parameters, 2 "y = 3", 3 the raise.
    assert error.cell_index == 3
    assert (error.ename, error.evalue) == ("ValueError", "boom 5")
    assert str(notebook) in str(error)
    assert "raise ValueError(f'boom {x}')" in str(error)
    assert "ValueError: boom 5" in str(error)
    stored = read_run_record(tmp_path / "out")
    assert stored.status == "failed"
    assert stored.error["evalue"] == "boom 5"
    executed = (tmp_path / "out" / "bad.ipynb").read_text()
    assert "boom 5" in executed
    assert "never\\n" not in executed


@pytest.mark.slow
def test_failed_run_is_not_reused(tmp_path):
    notebook = write_notebook(tmp_path / "flaky.ipynb", "x = 1\noutput_dir = None", [WRITE_RESULT])
    atomic_write_json(tmp_path / "out" / "run.json", fake_record(notebook, tmp_path / "out", status="failed").to_json())

    record = run_notebook(notebook, tmp_path / "out", {"x": 4}, kernel_name=KERNEL, progress_bar=False)

    assert record.status == "ok"
    assert read_result(tmp_path / "out") == {"double": 8}


@pytest.mark.slow
def test_run_batch_folder_per_seed(tmp_path):
    notebook = write_notebook(
        tmp_path / "batch.ipynb",
        "dataset = 'fashion_mnist'\nseed = 0\nx = 1\noutput_dir = None",
        [WRITE_RESULT.replace('{"double": x * 2}', '{"dataset": dataset, "seed": seed, "x": x}')],
    )

    records = run_batch(notebook, ["toy"], [1, 2], {"x": 3}, tmp_path / "runs", kernel_name=KERNEL)

    assert [record.status for record in records] == ["ok", "ok"]
    assert read_result(tmp_path / "runs" / "batch" / "toy" / "seed1") == {"dataset": "toy", "seed": 1, "x": 3}
    assert read_result(tmp_path / "runs" / "batch" / "toy" / "seed2") == {"dataset": "toy", "seed": 2, "x": 3}


def test_run_batch_rejects_reserved_parameters(doubling_notebook, tmp_path):
    with pytest.raises(ValueError, match=r"\['seed'\]"):
        run_batch(doubling_notebook, ["toy"], [1], {"seed": 3}, tmp_path / "runs", kernel_name=KERNEL)


def test_run_dir_layout():
    assert run_dir_for("runs", "notebooks/01_confusion_discovery.ipynb", "fashion_mnist", 2) == Path(
        "runs/01_confusion_discovery/fashion_mnist/seed2"
    )


def test_register_kernel_into_prefix(tmp_path):
    path = register_kernel(prefix=tmp_path)
    spec = json.loads((path / "kernel.json").read_text())

    assert path == tmp_path / "share" / "jupyter" / "kernels" / "capt"
    assert spec["argv"][0] == sys.executable
    assert spec["display_name"] == "Python (capt)"


def test_capt_kernel_listed_in_environment():
    from jupyter_client.kernelspec import KernelSpecManager

    if "capt" not in KernelSpecManager().find_kernel_specs():
        assert main(["kernel"]) == 0
    listing = subprocess.run(
        [str(Path(sys.executable).with_name("jupyter")), "kernelspec", "list", "--json"],
        capture_output=True, text=True, check=True, timeout=60,
    )
    kernelspecs = json.loads(listing.stdout)["kernelspecs"]

    assert "capt" in kernelspecs
    assert Path(kernelspecs["capt"]["resource_dir"]).is_relative_to(Path(sys.prefix))
    # The kernel must start this environment's interpreter (python or python3 in its bin folder).
    kernel_python = Path(kernelspecs["capt"]["spec"]["argv"][0])
    assert kernel_python.parent == Path(sys.executable).parent
    assert kernel_python.resolve() == Path(sys.executable).resolve()


SANITIZE_CASES = [
    ("Executing: 100%|██████████| 7/7 [00:07<00:00,  1.01s/cell]", "Executing: PROGRESS-BAR"),
    (" 40%|████      | 2/5 [00:01<00:02,  1.50it/s]", " PROGRESS-BAR"),
    ("epoch 3: 120.5 it/s", "epoch 3: RATE"),
    ("finished in 12.5 s", "finished in DURATION"),
    ("took 350ms", "took DURATION"),
    ("<Figure size 640x480 with 1 Axes>", "<Figure>"),
    ("<object at 0x7f3a2b1c9d10>", "<object at 0xADDRESS>"),
    ("started 2026-12-04T20:24:57+00:00", "started DATE-TIME"),
    ("built 2026-12-04 20:25 UTC", "built DATE-TIME"),
    ("wrote /tmp/pytest-of-root/pytest-3/test_x0/runs/a.json", "wrote TMP-PATH"),
    ("saved /work/main/runs/book-runs/01/result.json", "saved RUNS/book-runs/01/result.json"),
    ("accuracy 0.8123 on 16 shots, 5 samples", "accuracy 0.8123 on 16 shots, 5 samples"),
]


@pytest.mark.parametrize(("text", "expected"), SANITIZE_CASES)
def test_nbval_sanitize_patterns(text, expected):
    patterns = get_sanitize_patterns((REPO_ROOT / "tests" / "nbval_sanitize.cfg").read_text())
    assert patterns, "nbval found no regex/replace pairs"
    for regex, replacement in patterns:  # nbval applies them in file order with re.sub
        text = re.sub(regex, replacement, text)

    assert text == expected


# Book staging and building. A fake book repository has the real _config.yml and pages
# of this repository and one tiny notebook in place of the project's notebooks.

TOC = """format: jb-book
root: book/intro
chapters:
  - file: book/method
  - file: notebooks/tiny
  - file: status
"""


@pytest.fixture
def book_repo(tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / "_config.yml").write_text((REPO_ROOT / "_config.yml").read_text())
    (repo / "_toc.yml").write_text(TOC)
    (repo / "book").mkdir()
    for page in ("method.md", "references.bib"):
        (repo / "book" / page).write_text((REPO_ROOT / "book" / page).read_text())
    (repo / "book" / "intro.md").write_text(
        "# Tiny book\n\nThe notebook {doc}`../notebooks/tiny` and the {doc}`../status` page. {cite:p}`shao2026capt`\n"
    )
    write_notebook(repo / "notebooks" / "tiny.ipynb", "x = 21\noutput_dir = None", ["print('answer', x * 2)"],
                   title="# Tiny chapter")
    return repo


def fake_record(notebook: Path, output_dir: Path, status: str = "ok") -> RunRecord:
    return RunRecord(
        notebook=str(notebook), output_dir=str(output_dir), output_notebook=str(output_dir / f"{notebook.stem}.ipynb"),
        parameters={}, kernel_name=KERNEL, status=status, started_at="2026-01-01T00:00:00+00:00",
        finished_at="2026-01-01T00:00:01+00:00", wall_seconds=1.0, notebook_sha256=file_sha256(notebook),
        library_sha256=library_source_sha256(), git_revision=None, git_dirty=None, environment={},
    )


def fake_book_run(repo: Path, runs: Path, status: str = "ok", error_output: bool = False) -> Path:
    """Write a book run of notebooks/tiny.ipynb by hand, without executing it."""
    notebook = repo / "notebooks" / "tiny.ipynb"
    run_dir = book_run_dir(runs, "tiny")
    nb = nbformat.read(notebook, as_version=4)
    if error_output:
        nb.cells[2].outputs = [nbformat.v4.new_output("error", ename="KeyError", evalue="'x'", traceback=[])]
    run_dir.mkdir(parents=True)
    nbformat.write(nb, run_dir / "tiny.ipynb")
    atomic_write_json(run_dir / "run.json", fake_record(notebook, run_dir, status).to_json())
    return run_dir


def test_toc_entries_in_order(book_repo):
    assert toc_entries(book_repo / "_toc.yml") == ["book/intro", "book/method", "notebooks/tiny", "status"]
    assert toc_notebooks(book_repo / "_toc.yml") == ["tiny"]


def test_repository_toc_lists_every_notebook():
    entries = toc_entries(REPO_ROOT / "_toc.yml")
    notebooks = sorted(f"notebooks/{path.stem}" for path in (REPO_ROOT / "notebooks").glob("*.ipynb"))

    assert entries[:2] == ["book/intro", "book/method"]
    assert entries[-1] == "status"
    assert sorted(entry for entry in entries if entry.startswith("notebooks/")) == notebooks


def test_stage_book_layout(book_repo, tmp_path):
    runs = tmp_path / "runs"
    fake_book_run(book_repo, runs)

    book_dir = stage_book(book_repo, runs)

    assert book_dir == runs / "book"
    staged = sorted(path.relative_to(book_dir).as_posix() for path in book_dir.rglob("*") if path.is_file())
    assert staged == [
        "_config.yml", "_toc.yml", "book/intro.md", "book/method.md", "book/references.bib",
        "notebooks/tiny.ipynb", "status.md",
    ]
    status = (book_dir / "status.md").read_text()
    assert "| `book-runs/tiny` | ok | defaults | 1.0 s | 2026-01-01T00:00:00+00:00 | n/a |" in status


def test_stage_book_missing_run(book_repo, tmp_path):
    with pytest.raises(FileNotFoundError, match="notebooks/tiny"):
        stage_book(book_repo, tmp_path / "runs")


def test_stage_book_failed_run(book_repo, tmp_path):
    fake_book_run(book_repo, tmp_path / "runs", status="failed")

    with pytest.raises(ValueError, match="status 'failed'"):
        stage_book(book_repo, tmp_path / "runs")


def test_stage_book_error_output(book_repo, tmp_path):
    fake_book_run(book_repo, tmp_path / "runs", error_output=True)

    with pytest.raises(ValueError, match=r"error outputs in cell\(s\) \[2\]"):
        stage_book(book_repo, tmp_path / "runs")


def test_stage_book_stale_notebook(book_repo, tmp_path):
    fake_book_run(book_repo, tmp_path / "runs")
    write_notebook(book_repo / "notebooks" / "tiny.ipynb", "x = 20\noutput_dir = None", ["print('answer', x * 2)"])

    with pytest.raises(ValueError, match="changed after its book run"):
        stage_book(book_repo, tmp_path / "runs")


def test_stage_book_unknown_toc_entry(book_repo, tmp_path):
    (book_repo / "_toc.yml").write_text(TOC.replace("book/method", "book/missing"))
    fake_book_run(book_repo, tmp_path / "runs")

    with pytest.raises(FileNotFoundError, match="'book/missing'"):
        stage_book(book_repo, tmp_path / "runs")


def test_stage_book_protects_sources(book_repo):
    fake_book_run(book_repo, book_repo / "runs")

    with pytest.raises(ValueError, match="contains the book's sources"):
        stage_book(book_repo, book_repo)

    assert (book_repo / "book" / "intro.md").is_file()


@pytest.mark.slow
def test_book_builds_strictly(book_repo, tmp_path):
    runs = tmp_path / "runs"
    records = execute_book_notebooks(book_repo, runs, kernel_name=KERNEL)

    index = build_book(stage_book(book_repo, runs))

    assert [record.status for record in records] == ["ok"]
    assert index == runs / "book" / "_build" / "html" / "index.html"
    chapter = (runs / "book" / "_build" / "html" / "notebooks" / "tiny.html").read_text()
    assert "answer 42" in chapter
    assert "book-runs/tiny" in (runs / "book" / "_build" / "html" / "status.html").read_text()
