"""Stage the Jupyter Book under ``runs/book/`` and build it strictly.

Jupyter Book resolves the pages of ``_toc.yml`` relative to the book root, but the
executed notebooks live under ``runs/``, away from the sources. So the book is built
from a staged copy:

    runs/book/_config.yml, _toc.yml      copied from the repository root
    runs/book/book/...                   copied from the repository's book/ folder
    runs/book/notebooks/<stem>.ipynb     copied from runs/book-runs/<stem>/<stem>.ipynb
    runs/book/status.md                  generated from every run.json under runs/
    runs/book/_build/html/index.html     the built book

A toc entry ``notebooks/<stem>`` always shows the book run of
``notebooks/<stem>.ipynb``: one execution with the notebook's default parameters, in
``runs/book-runs/<stem>/`` (``execute_book_notebooks`` makes it). Runs made with
``capt run`` for other datasets and seeds appear only on the status page.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any, Iterator

import nbformat
import yaml

from capt_lib.runs.papermill_runner import (
    DEFAULT_KERNEL,
    OUTPUT_DIR_PARAMETER,
    RUN_RECORD_FILE,
    RunRecord,
    library_source_sha256,
    read_run_record,
    run_notebook,
)
from capt_lib.utils.cache import file_sha256
from capt_lib.utils.io import atomic_write_text, read_json

logger = logging.getLogger(__name__)

BOOK_RUNS_DIR = "book-runs"  # folder under runs_dir with the runs the book shows
STAGED_BOOK_DIR = "book"  # folder under runs_dir where the book is staged and built
PAGES_DIR = "book"  # repository folder with the hand-written pages
NOTEBOOKS_DIR = "notebooks"  # repository folder with the source notebooks
STATUS_PAGE = "status"  # toc entry of the generated status page
BOOK_CONFIG_FILES = ("_config.yml", "_toc.yml")
STRICT_BUILD_FLAGS = ("-W", "-n", "--keep-going")  # warnings are errors, missing references warn
ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")  # colour codes in Sphinx's output


def book_run_dir(runs_dir: str | os.PathLike, notebook_stem: str) -> Path:
    """Return the folder of the run of ``notebooks/<stem>.ipynb`` that the book shows."""
    return Path(runs_dir) / BOOK_RUNS_DIR / notebook_stem


def toc_entries(toc_path: str | os.PathLike) -> list[str]:
    """Return every ``root`` and ``file`` entry of a Jupyter Book ``_toc.yml``, in order."""
    toc_path = Path(toc_path)
    if not toc_path.is_file():
        raise FileNotFoundError(f"table of contents {toc_path} does not exist")
    toc = yaml.safe_load(toc_path.read_text(encoding="utf-8"))
    if not isinstance(toc, dict) or "root" not in toc:
        raise ValueError(f"{toc_path} has no 'root' entry, which Jupyter Book needs as the first page")
    return [str(toc["root"]), *_nested_files(toc)]


def toc_notebooks(toc_path: str | os.PathLike) -> list[str]:
    """Return the stems of the toc entries ``notebooks/<stem>``, which show executed notebooks."""
    prefix = NOTEBOOKS_DIR + "/"
    return [entry[len(prefix):] for entry in toc_entries(toc_path) if entry.startswith(prefix)]


def execute_book_notebooks(
    repo_root: str | os.PathLike,
    runs_dir: str | os.PathLike,
    *,
    kernel_name: str = DEFAULT_KERNEL,
    force: bool = False,
    log_output: bool = False,
) -> list[RunRecord]:
    """Run every notebook of the toc with its default parameters into its book-run folder.

    Runs that are already up to date are reused (see ``run_notebook``).
    """
    repo_root = Path(repo_root)
    records = []
    for stem in toc_notebooks(repo_root / "_toc.yml"):
        notebook = repo_root / NOTEBOOKS_DIR / f"{stem}.ipynb"
        records.append(
            run_notebook(notebook, book_run_dir(runs_dir, stem), {}, kernel_name=kernel_name, force=force, log_output=log_output)
        )
    return records


def stage_book(repo_root: str | os.PathLike, runs_dir: str | os.PathLike) -> Path:
    """Copy the book's sources and executed notebooks into ``<runs_dir>/book`` and return it.

    The staged folder is rebuilt from scratch each time. Raises FileNotFoundError for a
    missing page or executed notebook, and ValueError for a book run that failed, contains
    an error output, or was executed from a different version of its notebook.
    """
    repo_root, runs_dir = Path(repo_root), Path(runs_dir)
    book_dir = runs_dir / STAGED_BOOK_DIR
    protected = {repo_root.resolve(), repo_root.resolve() / PAGES_DIR, *repo_root.resolve().parents}
    if book_dir.resolve() in protected:
        raise ValueError(
            f"runs_dir={str(runs_dir)!r} would stage the book in {book_dir}, which contains the book's "
            "sources and is deleted before staging; pass a runs folder such as 'runs'"
        )
    if book_dir.exists():
        shutil.rmtree(book_dir)
    book_dir.mkdir(parents=True)

    for name in BOOK_CONFIG_FILES:
        source = repo_root / name
        if not source.is_file():
            raise FileNotFoundError(f"book configuration {source} does not exist")
        shutil.copy2(source, book_dir / name)
    if (repo_root / PAGES_DIR).is_dir():
        shutil.copytree(repo_root / PAGES_DIR, book_dir / PAGES_DIR)

    for entry in toc_entries(repo_root / "_toc.yml"):
        _stage_entry(entry, repo_root, runs_dir, book_dir)

    logger.info("staged the book in %s", book_dir)
    return book_dir


def build_book(book_dir: str | os.PathLike) -> Path:
    """Build the staged book to HTML with warnings as errors and return ``index.html``.

    Raises RuntimeError with Sphinx's warnings when the build fails.
    """
    book_dir = Path(book_dir)
    command = [str(_jupyter_book_executable()), "build", str(book_dir), *STRICT_BUILD_FLAGS]
    logger.info("building the book: %s", " ".join(command))
    result = subprocess.run(command, capture_output=True, text=True)

    if result.returncode != 0:
        output = ANSI_ESCAPE.sub("", result.stdout + result.stderr)
        problems = [line for line in output.splitlines() if "WARNING" in line or "ERROR" in line]
        details = "\n".join(problems[:30]) or "\n".join(output.splitlines()[-30:])
        raise RuntimeError(
            f"jupyter-book build of {book_dir} failed with exit code {result.returncode}:\n{details}\n"
            f"The pages under {book_dir} are staged copies, so fix the page in the repository's "
            f"{PAGES_DIR}/ or {NOTEBOOKS_DIR}/ folder ({STATUS_PAGE}.md is written by capt_lib/runs/book.py)"
        )

    index = book_dir / "_build" / "html" / "index.html"
    if not index.is_file():
        raise RuntimeError(f"jupyter-book build of {book_dir} reported success but wrote no {index}")
    logger.info("built the book: %s", index)
    return index


def write_status_page(path: str | os.PathLike, runs_dir: str | os.PathLike) -> Path:
    """Write a MyST page with one row per run.json under ``runs_dir`` (status, times, versions, hardware)."""
    runs_dir = Path(runs_dir)
    runs = [(folder, read_json(folder / RUN_RECORD_FILE)) for folder in _run_folders(runs_dir)]

    lines = [
        "# Execution status",
        "",
        "Every notebook run found under the runs folder when this book was built "
        f"({_utc_now()}). Parameters leave out `{OUTPUT_DIR_PARAMETER}`, which is the run folder. "
        "The book pages show the runs under `book-runs/`.",
        "",
        "## Runs",
        "",
        "| run folder | status | parameters | wall time | started (UTC) | git revision |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for folder, record in runs:
        lines.append(_table_row([
            f"`{folder.relative_to(runs_dir).as_posix()}`",
            str(record.get("status")),
            _format_parameters(record.get("parameters", {})),
            _format_seconds(record.get("wall_seconds")),
            str(record.get("started_at")),
            _format_revision(record.get("git_revision"), record.get("git_dirty")),
        ]))

    lines += [
        "",
        "## Software and hardware",
        "",
        "| run folder | python | torch | open_clip | numpy | CPU | memory | GPU |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for folder, record in runs:
        environment = record.get("environment", {})
        packages = environment.get("packages", {})
        lines.append(_table_row([
            f"`{folder.relative_to(runs_dir).as_posix()}`",
            str(environment.get("python")),
            str(packages.get("torch")),
            str(packages.get("open_clip_torch")),
            str(packages.get("numpy")),
            f"{environment.get('cpu')} ({environment.get('cpu_count')} cores)",
            f"{environment.get('memory_gib')} GiB",
            ", ".join(environment.get("gpus") or []) or "none",
        ]))
    if not runs:
        lines += ["", f"No run records were found under `{runs_dir.name}/`."]

    return atomic_write_text(path, "\n".join(lines) + "\n")


def _nested_files(node: Any) -> Iterator[str]:
    """Yield the ``file`` entries of a toc node and of its parts, chapters and sections."""
    if isinstance(node, list):
        for item in node:
            yield from _nested_files(item)
    elif isinstance(node, dict):
        if "file" in node:
            yield str(node["file"])
        for key in ("parts", "chapters", "sections"):
            if key in node:
                yield from _nested_files(node[key])


def _stage_entry(entry: str, repo_root: Path, runs_dir: Path, book_dir: Path) -> None:
    """Put the page for one toc entry into the staged book."""
    if entry == STATUS_PAGE:
        write_status_page(book_dir / f"{STATUS_PAGE}.md", runs_dir)
        return

    if entry.startswith(NOTEBOOKS_DIR + "/"):
        stem = entry[len(NOTEBOOKS_DIR) + 1:]
        executed = _checked_book_run(stem, repo_root, runs_dir)
        target = book_dir / NOTEBOOKS_DIR / f"{stem}.ipynb"
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(executed, target)
        return

    # Hand-written pages were copied with the pages folder, so only check that the entry resolves.
    if not any((book_dir / f"{entry}{suffix}").is_file() for suffix in (".md", ".ipynb")):
        raise FileNotFoundError(
            f"_toc.yml entry {entry!r} matches no page: expected {repo_root / entry}.md, "
            f"an executed notebook {NOTEBOOKS_DIR}/<stem>, or the generated {STATUS_PAGE!r} page"
        )


def _checked_book_run(stem: str, repo_root: Path, runs_dir: Path) -> Path:
    """Return the executed copy of ``notebooks/<stem>.ipynb`` after checking that the book may show it."""
    run_dir = book_run_dir(runs_dir, stem)
    source = repo_root / NOTEBOOKS_DIR / f"{stem}.ipynb"
    executed = run_dir / f"{stem}.ipynb"
    record = read_run_record(run_dir)
    rerun_hint = f"run `capt book` (or `make book`) to execute {source} first"

    if record is None or not executed.is_file():
        raise FileNotFoundError(f"the book lists {NOTEBOOKS_DIR}/{stem}, but {run_dir} has no executed run; {rerun_hint}")
    if record.status != "ok":
        raise ValueError(f"the book run of {source} in {run_dir} has status {record.status!r}, not 'ok': {record.error}")
    if source.is_file() and file_sha256(source) != record.notebook_sha256:
        raise ValueError(f"{source} changed after its book run in {run_dir} was executed; {rerun_hint}")
    if record.library_sha256 != library_source_sha256():
        logger.warning("capt_lib changed after the book run in %s was executed; its outputs may be stale", run_dir)

    errors = _error_outputs(executed)
    if errors:
        raise ValueError(f"the executed notebook {executed} contains error outputs in cell(s) {errors}")
    return executed


def _error_outputs(notebook: Path) -> list[int]:
    """Return the indices of cells whose outputs include an error."""
    nb = nbformat.read(notebook, as_version=4)
    return [
        index
        for index, cell in enumerate(nb.cells)
        if any(output.get("output_type") == "error" for output in cell.get("outputs", []))
    ]


def _run_folders(runs_dir: Path) -> list[Path]:
    """Return every folder under ``runs_dir`` with a run.json, outside the staged book."""
    staged = runs_dir / STAGED_BOOK_DIR
    return sorted(path.parent for path in runs_dir.rglob(RUN_RECORD_FILE) if staged not in path.parents)


def _jupyter_book_executable() -> Path:
    """Find the ``jupyter-book`` script of this interpreter's environment."""
    executable = Path(sys.executable).with_name("jupyter-book")
    if executable.is_file():
        return executable
    found = shutil.which("jupyter-book")
    if found is None:
        raise FileNotFoundError(
            f"jupyter-book was not found next to {sys.executable} or on PATH; "
            "install it with `pip install 'jupyter-book>=1.0.4,<2'`"
        )
    return Path(found)


def _table_row(cells: list[str]) -> str:
    return "| " + " | ".join(cell.replace("|", "\\|").replace("\n", " ") for cell in cells) + " |"


def _format_parameters(parameters: dict[str, Any]) -> str:
    shown = {name: value for name, value in parameters.items() if name != OUTPUT_DIR_PARAMETER}
    if not shown:
        return "defaults"
    return ", ".join(f"`{name}={_json_scalar(value)}`" for name, value in sorted(shown.items()))


def _json_scalar(value: Any) -> str:
    return json.dumps(value).replace("`", "'")


def _format_seconds(seconds: float | None) -> str:
    if seconds is None:
        return "n/a"
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, rest = divmod(round(seconds), 60)
    return f"{minutes} min {rest:02d} s"


def _format_revision(revision: str | None, dirty: bool | None) -> str:
    if revision is None:
        return "n/a"
    return f"`{revision[:10]}`" + (" (uncommitted changes)" if dirty else "")


def _utc_now() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
