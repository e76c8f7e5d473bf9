"""Execute parameterised notebooks with papermill and record each run in ``run.json``.

Every run has its own folder. ``capt run`` uses ``<runs_dir>/<notebook-stem>/<dataset>/seed<seed>/``
(see ``run_dir_for``), and the book uses ``<runs_dir>/book-runs/<notebook-stem>/``. A run
folder contains:

- ``<notebook-stem>.ipynb``: the executed copy, saved after every cell, so a failed run
  keeps the outputs up to the failing cell;
- ``run.json``: the run record (parameters, status, wall time, software versions,
  hardware, git revision, and the error when the run failed);
- whatever the notebook itself writes there. The runner passes the folder to the notebook
  as the ``output_dir`` parameter when the notebook declares one.

The kernel runs in the caller's working directory, so relative paths inside a notebook
(such as the default cache folder ``runs/cache``) resolve against the directory that
``capt`` or ``make`` was started from.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import json
import logging
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterable, Mapping

import nbformat

from capt_lib.utils.cache import file_sha256
from capt_lib.utils.io import atomic_write_json, read_json

logger = logging.getLogger(__name__)

DEFAULT_KERNEL = "capt"
KERNEL_DISPLAY_NAME = "Python (capt)"
RUN_RECORD_FILE = "run.json"
RUN_RECORD_VERSION = 1
OUTPUT_DIR_PARAMETER = "output_dir"
PARAMETERS_TAG = "parameters"

# Distributions whose versions go into every run record.
RECORDED_PACKAGES = ("torch", "torchvision", "open_clip_torch", "numpy", "capt", "papermill", "ipykernel")


@dataclasses.dataclass(frozen=True)
class NotebookParameter:
    """One assignment in a notebook's cell tagged ``parameters``."""

    name: str  # variable name
    default: str  # right-hand side as written in the cell (Python source, e.g. "'fashion_mnist'")
    type_name: str | None  # type from an annotation such as `seed: int = 1`, or None without one
    help: str  # trailing comment of the assignment, "" when there is none


@dataclasses.dataclass(frozen=True)
class RunRecord:
    """Record of one notebook run, stored as ``run.json`` in the run folder."""

    notebook: str  # source notebook path, as given by the caller
    output_dir: str  # run folder
    output_notebook: str  # executed copy inside the run folder
    parameters: dict[str, Any]  # values injected into the notebook, including output_dir when declared
    kernel_name: str  # Jupyter kernel that executed the notebook
    status: str  # "running" while executing, then "ok" or "failed"
    started_at: str  # ISO 8601 UTC time of the start
    finished_at: str | None  # ISO 8601 UTC time of the end, or None while running
    wall_seconds: float | None  # execution time including kernel start-up, or None while running
    notebook_sha256: str  # hash of the source notebook, so an edited notebook is rerun
    library_sha256: str  # hash of every capt_lib/*.py file, so a library change is rerun
    git_revision: str | None  # commit of the working tree, or None outside a git checkout
    git_dirty: bool | None  # True when the working tree had uncommitted changes
    environment: dict[str, Any]  # kernel's Python and package versions, CPU, memory, GPUs
    error: dict[str, Any] | None = None  # failing cell and exception when status is "failed"
    reused: bool = False  # True when run_notebook returned an earlier ok run instead of executing

    def to_json(self) -> dict[str, Any]:
        fields = dataclasses.asdict(self)
        del fields["reused"]  # a property of one call, not of the run
        return {"record_version": RUN_RECORD_VERSION, **fields}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "RunRecord":
        known = {field.name for field in dataclasses.fields(cls)} - {"reused"}
        return cls(**{name: value for name, value in data.items() if name in known})


class NotebookExecutionError(RuntimeError):
    """A cell of an executed notebook raised an exception."""

    def __init__(
        self,
        notebook: Path,
        output_notebook: Path,
        cell_index: int,
        exec_count: int | None,
        source: str,
        ename: str,
        evalue: str,
        record: RunRecord | None = None,
    ):
        self.notebook = notebook
        self.output_notebook = output_notebook
        self.cell_index = cell_index  # 0-based index in the source notebook, markdown cells included
        self.exec_count = exec_count
        self.source = source
        self.ename = ename
        self.evalue = evalue
        self.record = record
        super().__init__(self._message())

    def _message(self) -> str:
        source_head = "\n".join("    " + line for line in self.source.splitlines()[:3])
        return (
            f"{self.notebook} failed in cell {self.cell_index} (In [{self.exec_count}]):\n"
            f"{source_head}\n"
            f"{self.ename}: {self.evalue}\n"
            f"The executed notebook with the full traceback is {self.output_notebook}"
        )


def declared_parameters(notebook_path: str | os.PathLike) -> dict[str, NotebookParameter]:
    """Return the parameters declared in the notebook's cell tagged ``parameters``.

    Raises FileNotFoundError for a missing notebook, and ValueError when the notebook has
    no cell tagged ``parameters`` or no kernelspec in its metadata (papermill needs the
    kernel to pick the language that parses the cell).
    """
    import papermill

    notebook_path = Path(notebook_path)
    nb = _read_notebook(notebook_path)

    if not any(PARAMETERS_TAG in cell.metadata.get("tags", []) for cell in nb.cells):
        raise ValueError(
            f"{notebook_path} has no cell tagged {PARAMETERS_TAG!r}; tag the cell that assigns the "
            "notebook's settings (JupyterLab: Property Inspector > Common Tools > Cell Tags)"
        )
    if not nb.metadata.get("kernelspec", {}).get("name"):
        raise ValueError(
            f"{notebook_path} has no kernelspec in its metadata; save it once with the "
            f"{KERNEL_DISPLAY_NAME!r} kernel selected"
        )

    inferred = papermill.inspect_notebook(str(notebook_path))
    return {
        name: NotebookParameter(
            name=name,
            default=fields["default"],
            type_name=None if fields["inferred_type_name"] == "None" else fields["inferred_type_name"],
            help=fields["help"],
        )
        for name, fields in inferred.items()
    }


def check_parameters(notebook_path: str | os.PathLike, parameters: Mapping[str, Any]) -> None:
    """Raise ValueError when ``parameters`` names something the notebook does not declare.

    papermill only logs a warning for an unknown parameter and runs the notebook with its
    default, so a misspelled setting would otherwise go unnoticed.
    """
    _check_declared(notebook_path, parameters, declared_parameters(notebook_path))


def _check_declared(
    notebook_path: str | os.PathLike, parameters: Mapping[str, Any], declared: Mapping[str, NotebookParameter]
) -> None:
    unknown = sorted(set(parameters) - set(declared))
    if unknown:
        raise ValueError(
            f"{notebook_path} does not declare the parameter(s) {unknown}; "
            f"its cell tagged {PARAMETERS_TAG!r} declares {sorted(declared)}"
        )


def run_dir_for(runs_dir: str | os.PathLike, notebook: str | os.PathLike, dataset: str, seed: int) -> Path:
    """Return the run folder ``<runs_dir>/<notebook-stem>/<dataset>/seed<seed>``."""
    return Path(runs_dir) / Path(notebook).stem / dataset / f"seed{seed}"


def read_run_record(output_dir: str | os.PathLike) -> RunRecord | None:
    """Return the record in ``output_dir/run.json``, or None when the folder has none."""
    path = Path(output_dir) / RUN_RECORD_FILE
    if not path.is_file():
        return None
    return RunRecord.from_json(read_json(path))


def run_notebook(
    notebook: str | os.PathLike,
    output_dir: str | os.PathLike,
    parameters: Mapping[str, Any] | None = None,
    *,
    kernel_name: str = DEFAULT_KERNEL,
    log_output: bool = False,
    progress_bar: bool = True,
    force: bool = False,
) -> RunRecord:
    """Execute ``notebook`` with ``parameters`` into ``output_dir`` and write ``run.json``.

    A run is skipped, and its earlier record returned with ``reused=True``, when
    ``run.json`` records that it finished ok with the same parameters, kernel, notebook content and
    library code, unless ``force`` is set. ``output_dir`` is left out of that comparison
    because the record's location already fixes it.

    Raises ValueError for an undeclared parameter or an unregistered kernel, and
    NotebookExecutionError when a cell fails (the executed notebook and a "failed" record
    are written first).
    """
    notebook = Path(notebook)
    output_dir = Path(output_dir)
    output_notebook = output_dir / f"{notebook.stem}.ipynb"

    declared = declared_parameters(notebook)
    parameters = with_output_dir(output_dir, dict(parameters or {}), declared)
    _check_declared(notebook, parameters, declared)
    kernel_python = _kernel_python(kernel_name)

    notebook_sha256 = file_sha256(notebook)
    library_sha256 = library_source_sha256()
    previous = read_run_record(output_dir)
    if previous is not None and not force:
        reason = rerun_reason(previous, parameters, kernel_name, notebook_sha256, library_sha256, output_notebook)
        if reason is None:
            logger.info(
                "skipping %s: %s already finished ok at %s; pass --force (make book BOOK_ARGS=--force) to run it again",
                notebook,
                output_dir,
                previous.finished_at,
            )
            return dataclasses.replace(previous, reused=True)
        logger.info("rerunning %s into %s because %s", notebook, output_dir, reason)

    git_revision, git_dirty = git_state(notebook.resolve().parent)
    record = RunRecord(
        notebook=str(notebook),
        output_dir=str(output_dir),
        output_notebook=str(output_notebook),
        parameters=_as_json(parameters),
        kernel_name=kernel_name,
        status="running",
        started_at=_utc_now(),
        finished_at=None,
        wall_seconds=None,
        notebook_sha256=notebook_sha256,
        library_sha256=library_sha256,
        git_revision=git_revision,
        git_dirty=git_dirty,
        environment=_environment(kernel_python),
    )
    output_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(output_dir / RUN_RECORD_FILE, record.to_json())

    logger.info("executing %s into %s with %s", notebook, output_dir, parameters)
    start = time.perf_counter()
    try:
        _execute(notebook, output_notebook, parameters, kernel_name, log_output, progress_bar)
    except BaseException as e:
        error = _describe_failure(e, notebook, injected=bool(parameters))
        record = _finish(record, "failed", time.perf_counter() - start, error)
        atomic_write_json(output_dir / RUN_RECORD_FILE, record.to_json())
        if error["cell_index"] is None:
            raise  # the kernel died, start-up timed out, or the user interrupted the run
        raise NotebookExecutionError(
            notebook, output_notebook, error["cell_index"], error["exec_count"], error["source"],
            error["ename"], error["evalue"], record,
        ) from e

    record = _finish(record, "ok", time.perf_counter() - start, None)
    atomic_write_json(output_dir / RUN_RECORD_FILE, record.to_json())
    logger.info("finished %s in %.1f s", notebook, record.wall_seconds)
    return record


def run_batch(
    notebook: str | os.PathLike,
    datasets: Iterable[str],
    seeds: Iterable[int],
    base_parameters: Mapping[str, Any] | None,
    runs_dir: str | os.PathLike,
    *,
    kernel_name: str = DEFAULT_KERNEL,
    log_output: bool = False,
    force: bool = False,
    keep_going: bool = False,
) -> list[RunRecord]:
    """Run ``notebook`` once per (dataset, seed) into ``run_dir_for(runs_dir, notebook, dataset, seed)``.

    ``dataset`` and ``seed`` are injected as parameters, so the notebook must declare both.
    The first failure is raised at once unless ``keep_going`` is set. In that case failed
    runs appear in the returned list with status "failed", and the caller decides what to
    do about them.
    """
    datasets, seeds = list(datasets), [int(seed) for seed in seeds]
    base_parameters = dict(base_parameters or {})
    clashing = sorted({"dataset", "seed", OUTPUT_DIR_PARAMETER} & set(base_parameters))
    if clashing:
        raise ValueError(
            f"base_parameters must not set {clashing}: run_batch sets dataset and seed per run "
            f"and {OUTPUT_DIR_PARAMETER} to the run folder"
        )

    records = []
    for dataset in datasets:
        for seed in seeds:
            parameters = {**base_parameters, "dataset": dataset, "seed": seed}
            output_dir = run_dir_for(runs_dir, notebook, dataset, seed)
            try:
                records.append(
                    run_notebook(notebook, output_dir, parameters, kernel_name=kernel_name, log_output=log_output, force=force)
                )
            except NotebookExecutionError as e:
                if not keep_going:
                    raise
                logger.error("%s", e)
                records.append(e.record)
    return records


def register_kernel(
    name: str = DEFAULT_KERNEL,
    display_name: str = KERNEL_DISPLAY_NAME,
    prefix: str | os.PathLike | None = None,
) -> Path:
    """Install a Jupyter kernelspec that runs this interpreter and return its folder.

    With the default ``prefix`` (``sys.prefix``) the kernelspec lands inside the virtual
    environment, where papermill and JupyterLab started from that environment find it.
    This is what ``python -m ipykernel install --sys-prefix --name capt`` does.
    """
    from ipykernel.kernelspec import install

    prefix = sys.prefix if prefix is None else str(prefix)
    path = Path(install(kernel_name=name, display_name=display_name, prefix=prefix))
    logger.info("registered Jupyter kernel %r (%s) at %s", name, sys.executable, path)
    return path


def library_source_sha256() -> str:
    """Hash the path and content of every ``.py`` file of the installed ``capt_lib``."""
    import capt_lib

    root = Path(capt_lib.__file__).parent
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        digest.update(path.relative_to(root).as_posix().encode("utf-8") + b"\0")
        digest.update(path.read_bytes() + b"\0")
    return digest.hexdigest()


def _read_notebook(path: Path) -> nbformat.NotebookNode:
    if not path.is_file():
        raise FileNotFoundError(f"notebook {path} does not exist")
    try:
        return nbformat.read(path, as_version=4)
    except Exception as e:  # nbformat raises several unrelated types for a corrupt file
        raise RuntimeError(f"could not read notebook {path}: {e}") from e


def with_output_dir(
    output_dir: Path, parameters: dict[str, Any], declared: Mapping[str, NotebookParameter]
) -> dict[str, Any]:
    """Add ``output_dir`` (absolute) when the notebook declares it and the caller did not set it."""
    if OUTPUT_DIR_PARAMETER in parameters:
        given = Path(parameters[OUTPUT_DIR_PARAMETER]).resolve()
        if given != output_dir.resolve():
            raise ValueError(
                f"parameter {OUTPUT_DIR_PARAMETER}={parameters[OUTPUT_DIR_PARAMETER]!r} differs from the "
                f"run folder {output_dir}; leave it out and the runner passes the run folder"
            )
        return parameters
    if OUTPUT_DIR_PARAMETER in declared:
        return {**parameters, OUTPUT_DIR_PARAMETER: str(output_dir.resolve())}
    return parameters


def _kernel_python(kernel_name: str) -> str:
    """Return the interpreter a kernelspec starts, raising ValueError for an unknown kernel."""
    from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel

    manager = KernelSpecManager()
    try:
        spec = manager.get_kernel_spec(kernel_name)
    except NoSuchKernel as e:
        available = sorted(manager.find_kernel_specs())
        raise ValueError(
            f"Jupyter kernel {kernel_name!r} is not registered (available: {available}); "
            "register the project's kernel with `capt kernel` or `make kernel`"
        ) from e

    # jupyter_client (KernelManager.format_kernel_cmd) replaces a bare "python" in argv[0]
    # with its own interpreter, so the kernel runs on sys.executable.
    executable = spec.argv[0]
    if executable in {"python", "python3", f"python{sys.version_info[0]}.{sys.version_info[1]}"}:
        return sys.executable
    return shutil.which(executable) or executable


def _execute(
    notebook: Path,
    output_notebook: Path,
    parameters: dict[str, Any],
    kernel_name: str,
    log_output: bool,
    progress_bar: bool,
) -> None:
    import papermill

    papermill.execute_notebook(
        str(notebook),
        str(output_notebook),
        parameters=parameters,
        kernel_name=kernel_name,
        log_output=log_output,
        progress_bar=progress_bar,
    )


def _describe_failure(error: BaseException, notebook: Path, injected: bool) -> dict[str, Any]:
    """Turn a papermill failure into the ``error`` field of the run record."""
    from papermill.exceptions import PapermillExecutionError

    if not isinstance(error, PapermillExecutionError):
        return {"cell_index": None, "exec_count": None, "source": "", "ename": type(error).__name__, "evalue": str(error)}

    return {
        "cell_index": _source_cell_index(notebook, error.cell_index) if injected else error.cell_index,
        "exec_count": error.exec_count,
        "source": error.source,
        "ename": error.ename,
        "evalue": error.evalue,
    }


def _source_cell_index(notebook: Path, executed_index: int) -> int:
    """Map a cell index of the executed copy back to the source notebook.

    When it has parameters to pass, papermill inserts one cell tagged ``injected-parameters``
    right after the cell tagged ``parameters``, so every later cell is shifted by one in the
    executed copy.
    """
    nb = _read_notebook(notebook)
    parameters_index = next(i for i, cell in enumerate(nb.cells) if PARAMETERS_TAG in cell.metadata.get("tags", []))
    return executed_index - 1 if executed_index > parameters_index else executed_index


def rerun_reason(
    previous: RunRecord,
    parameters: dict[str, Any],
    kernel_name: str,
    notebook_sha256: str,
    library_sha256: str,
    output_notebook: Path,
) -> str | None:
    """Say why an earlier run in the same folder cannot be reused, or return None when it can."""
    if previous.status != "ok":
        return f"its earlier status is {previous.status!r}"
    if not output_notebook.is_file():
        return f"the executed copy {output_notebook} is missing"
    if _without_output_dir(previous.parameters) != _without_output_dir(_as_json(parameters)):
        return f"the parameters changed from {previous.parameters} to {parameters}"
    if previous.kernel_name != kernel_name:
        return f"the kernel changed from {previous.kernel_name!r} to {kernel_name!r}"
    if previous.notebook_sha256 != notebook_sha256:
        return "the notebook changed"
    if previous.library_sha256 != library_sha256:
        return "the capt_lib sources changed"
    return None


def _without_output_dir(parameters: Mapping[str, Any]) -> dict[str, Any]:
    return {name: value for name, value in parameters.items() if name != OUTPUT_DIR_PARAMETER}


def _finish(record: RunRecord, status: str, wall_seconds: float, error: dict[str, Any] | None) -> RunRecord:
    return dataclasses.replace(
        record, status=status, finished_at=_utc_now(), wall_seconds=round(wall_seconds, 3), error=error
    )


def _as_json(value: Any) -> Any:
    """Round-trip through JSON, so that tuples and lists compare equal to what run.json stores."""
    return json.loads(json.dumps(value, default=str))


def _utc_now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def git_state(directory: Path) -> tuple[str | None, bool | None]:
    """Return (commit, has uncommitted changes) of the checkout that contains ``directory``."""
    try:
        revision = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=directory, capture_output=True, text=True, check=True, timeout=10
        ).stdout.strip()
        # --no-optional-locks keeps `git status` from rewriting the index while someone else uses it.
        changes = subprocess.run(
            ["git", "--no-optional-locks", "status", "--porcelain"],
            cwd=directory, capture_output=True, text=True, check=True, timeout=30,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None, None
    return revision, bool(changes.strip())


_VERSION_PROBE = """
import json, platform, sys
from importlib import metadata
packages = {}
for name in sys.argv[1:]:
    try:
        packages[name] = metadata.version(name)
    except metadata.PackageNotFoundError:
        packages[name] = None
print(json.dumps({"python": platform.python_version(), "executable": sys.executable, "packages": packages}))
"""


def _environment(kernel_python: str) -> dict[str, Any]:
    """Describe the kernel's software and this machine's hardware for the run record."""
    try:
        probe = subprocess.run(
            [kernel_python, "-c", _VERSION_PROBE, *RECORDED_PACKAGES],
            capture_output=True, text=True, check=True, timeout=60,
        )
        software = json.loads(probe.stdout)
    except (OSError, subprocess.SubprocessError, json.JSONDecodeError) as e:
        logger.warning("could not read package versions from the kernel's interpreter %s: %s", kernel_python, e)
        software = {"python": None, "executable": kernel_python, "packages": {}}

    return {
        **software,
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "memory_gib": _memory_gib(),
        "gpus": _gpu_names(),
    }


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _memory_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 2**20, 1)  # the file states kB
    except (OSError, ValueError, IndexError):
        pass
    return None


def _gpu_names() -> list[str]:
    """List NVIDIA GPUs as "name (memory)" through nvidia-smi, which avoids importing torch here."""
    # NOTE: GPUs of other vendors are not detected, so they are recorded as no GPU.
    if shutil.which("nvidia-smi") is None:
        return []
    try:
        result = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader"],
            capture_output=True, text=True, check=True, timeout=30,
        )
    except (OSError, subprocess.SubprocessError):
        return []
    gpus = []
    for line in result.stdout.splitlines():
        name, _, memory = line.strip().rpartition(", ")
        if name:
            gpus.append(f"{name} ({memory})")
    return gpus
