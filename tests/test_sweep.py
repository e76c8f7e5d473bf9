"""Sweeps: planning, GPU slots, resumable local runs, failures, the SLURM path and the CLI.

The tiny notebook here writes a results.json whose accuracy is a function of dataset
and seed (10 * len(dataset) + seed), so every expected value is known in advance. It
runs on the project kernel ``capt`` when that is registered, else on ``python3``. Tests
that execute notebooks are marked slow: each run starts a `capt run` subprocess and a
kernel, a few seconds on a loaded machine. No SLURM cluster exists here, so the SLURM
backend is exercised through submitit's DebugExecutor.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import nbformat
import pytest
from jupyter_client.kernelspec import KernelSpecManager

from capt_lib.evaluation.tables import collect_results
from capt_lib.runs.sweep import (
    SweepTask,
    add_sweep_parser,
    device_slots,
    parameter_text,
    plan_sweep,
    run_sweep,
    visible_gpus,
)

KERNEL = "capt" if "capt" in KernelSpecManager().find_kernel_specs() else "python3"
DATASETS = ["a", "bb"]
SEEDS = [1, 2]

PARAMETERS = """dataset = "a"  # dataset name
seed = 1  # seed
output_dir = None  # run folder, set by the runner
counter_file = None  # file that every finished execution appends "<dataset> <seed>" to
scale = 1.0  # factor on the accuracy"""

BODY = """import json, os, pathlib
if dataset == "broken":
    raise RuntimeError("broken on purpose")
metrics = {"accuracy": scale * (10 * len(dataset) + seed)}
results = {"settings": {"dataset": dataset, "seed": seed, "scale": scale}, "metrics": metrics}
pathlib.Path(output_dir, "results.json").write_text(json.dumps(results))
pathlib.Path(output_dir, "device.txt").write_text(os.environ.get("CUDA_VISIBLE_DEVICES", "<unset>"))
if counter_file:
    with open(counter_file, "a") as counter:
        counter.write(f"{dataset} {seed}\\n")"""


def write_notebook(path: Path, parameters: str = PARAMETERS, body: str = BODY) -> Path:
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": KERNEL, "display_name": KERNEL, "language": "python"}
    parameters_cell = nbformat.v4.new_code_cell(parameters)
    parameters_cell.metadata["tags"] = ["parameters"]
    nb.cells = [nbformat.v4.new_markdown_cell("# Tiny sweep notebook"), parameters_cell, nbformat.v4.new_code_cell(body)]
    path.parent.mkdir(parents=True, exist_ok=True)
    nbformat.write(nb, path)
    return path


def expected_accuracy(dataset: str, seed: int, scale: float = 1.0) -> float:
    return scale * (10 * len(dataset) + seed)


def read_results(run_dir: Path) -> dict:
    return json.loads((run_dir / "results.json").read_text())


def run_status(run_dir: Path) -> str | None:
    path = run_dir / "run.json"
    return json.loads(path.read_text())["status"] if path.is_file() else None


def counter_lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.is_file() else []


def interval(outcome) -> tuple[float, float]:
    start = dt.datetime.fromisoformat(outcome.started_at).timestamp()
    return start, start + outcome.wall_seconds


@pytest.fixture(scope="module")
def full_sweep(tmp_path_factory):
    """One uninterrupted sweep over DATASETS x SEEDS on two CPU slots, shared by several tests."""
    root = tmp_path_factory.mktemp("full")
    notebook = write_notebook(root / "tiny.ipynb")
    counter = root / "executions.txt"
    tasks = plan_sweep([notebook], DATASETS, SEEDS, {"counter_file": str(counter)}, root / "runs", kernel_name=KERNEL)
    report = run_sweep(tasks, max_parallel=2, gpus=[], progress=False, name="full", cwd=root)
    return {"root": root, "notebook": notebook, "counter": counter, "tasks": tasks, "report": report}


# Planning and devices: no notebook is executed.


def test_plan_sweep_order_and_folders(tmp_path):
    notebook = write_notebook(tmp_path / "tiny.ipynb")
    tasks = plan_sweep([notebook], DATASETS, SEEDS, {"scale": 2.0}, tmp_path / "runs", kernel_name=KERNEL)

    assert [(task.dataset, task.seed) for task in tasks] == [("a", 1), ("a", 2), ("bb", 1), ("bb", 2)]
    assert tasks[3].run_dir == tmp_path / "runs" / "tiny" / "bb" / "seed2"
    assert tasks[3].task_id == "tiny/bb/seed2"
    assert tasks[3].parameters == {"scale": 2.0}


def test_plan_sweep_grid_variants(tmp_path):
    notebook = write_notebook(tmp_path / "tiny.ipynb")
    tasks = plan_sweep([notebook], ["a"], [1], None, tmp_path / "runs", grid={"scale": [1, 4]}, kernel_name=KERNEL)

    assert [task.variant for task in tasks] == ["scale-1", "scale-4"]
    assert tasks[1].run_dir == tmp_path / "runs" / "scale-4" / "tiny" / "a" / "seed1"
    assert tasks[1].parameters == {"scale": 4}
    assert tasks[1].task_id == "tiny/scale-4/a/seed1"


def test_task_command_passes_parameters(tmp_path):
    task = SweepTask("nb.ipynb", "a", 3, {"scale": 0.5, "name": "x y"}, "runs", variant="scale-1", kernel_name="k")
    command = task.command(python="py", force=True)

    assert command[:5] == ["py", "-m", "capt_lib.runs.cli", "run", "nb.ipynb"]
    assert command[command.index("--runs-dir") + 1] == str(Path("runs") / "scale-1")
    assert command[command.index("--seed") + 1] == "3"
    assert ["-p", "scale", "0.5"] == command[command.index("scale") - 1 : command.index("scale") + 2]
    assert ["-p", "name", '"x y"'] == command[command.index("name") - 1 : command.index("name") + 2]
    assert command[-1] == "--force"


@pytest.mark.parametrize(
    ("value", "text"),
    [(1, "1"), (0.5, "0.5"), (1e-05, "1e-05"), (True, "true"), (None, "null"), ("fashion_mnist", '"fashion_mnist"'),
     ("yes", '"yes"'), ([1, 2], "[1, 2]"), ({"a": 1}, '{"a": 1}')],
)
def test_parameter_text_round_trips(value, text):
    assert parameter_text("x", value) == text


@pytest.mark.parametrize("value", ["1e-3", float("nan"), Path("p")])
def test_parameter_text_rejects_changed_values(value):
    with pytest.raises(ValueError, match="parameter x="):
        parameter_text("x", value)


def test_plan_sweep_rejects_bad_input(tmp_path):
    notebook = write_notebook(tmp_path / "tiny.ipynb")
    runs = tmp_path / "runs"

    with pytest.raises(ValueError, match=r"must not set \['seed'\]"):
        plan_sweep([notebook], ["a"], [1], {"seed": 2}, runs)
    with pytest.raises(ValueError, match=r"does not declare the parameter\(s\) \['lr'\]"):
        plan_sweep([notebook], ["a"], [1], {"lr": 0.1}, runs)
    with pytest.raises(ValueError, match=r"seeds lists \['1'\] more than once"):
        plan_sweep([notebook], ["a"], [1, 1], None, runs)
    with pytest.raises(ValueError, match="would reach the notebook as 0.001"):
        plan_sweep([notebook], ["a"], [1], {"scale": "1e-3"}, runs)
    with pytest.raises(FileNotFoundError, match="missing.ipynb"):
        plan_sweep([tmp_path / "missing.ipynb"], ["a"], [1], None, runs)

    no_seed = write_notebook(tmp_path / "no_seed.ipynb", parameters='dataset = "a"\noutput_dir = None')
    with pytest.raises(ValueError, match=r"does not declare \['seed'\]"):
        plan_sweep([no_seed], ["a"], [1], None, runs)


def test_device_slots():
    assert device_slots(["0", "1"], None) == ["0", "1"]
    assert device_slots([0, 1], 3) == ["0", "1", "0"]
    assert device_slots([], None) == [""]
    assert device_slots([], 2) == ["", ""]
    with pytest.raises(ValueError, match="max_parallel=0"):
        device_slots([], 0)


@pytest.mark.parametrize(("value", "expected"), [("2,3", ["2", "3"]), ("", []), ("1,-1,2", ["1"]), (" 0 , 1 ", ["0", "1"])])
def test_visible_gpus_reads_cuda_visible_devices(monkeypatch, value, expected):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", value)
    assert visible_gpus() == expected


def test_run_sweep_rejects_unknown_backend(tmp_path):
    task = SweepTask("nb.ipynb", "a", 1, {}, str(tmp_path))
    with pytest.raises(ValueError, match="backend='cloud' is invalid"):
        run_sweep([task], backend="cloud")


PROTOCOL_PARAMETERS = PARAMETERS + """
protocol = "base_to_novel"  # protocol preset
method = "capt"  # method preset
shots = 16  # shots per class"""


class PlannedTasks(Exception):
    """Raised by a stand-in for run_sweep, carrying the tasks that the CLI planned."""

    def __init__(self, tasks):
        super().__init__(f"{len(tasks)} tasks")
        self.tasks = tasks


def parse_sweep_arguments(arguments: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="capt")
    add_sweep_parser(parser.add_subparsers(dest="command"))
    return parser.parse_args(["sweep", *arguments])


def test_cli_protocol_fills_axes_and_shots_grid(tmp_path, monkeypatch):
    import capt_lib.runs.sweep as sweep_module

    def capture(tasks, **options):
        raise PlannedTasks(tasks)

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sweep_module, "run_sweep", capture)
    write_notebook(tmp_path / "tiny.ipynb", parameters=PROTOCOL_PARAMETERS)
    args = parse_sweep_arguments(["tiny.ipynb", "--protocol", "few_shot", "--method", "coop", "--dataset", "dtd"])

    with pytest.raises(PlannedTasks) as planned:
        args.handler(args)

    tasks = planned.value.tasks
    assert len(tasks) == 5 * 3  # shots 1, 2, 4, 8, 16 times the protocol's seeds 1, 2, 3
    assert [task.variant for task in tasks[::3]] == ["shots-1", "shots-2", "shots-4", "shots-8", "shots-16"]
    assert [task.seed for task in tasks[:3]] == [1, 2, 3]
    assert tasks[0].parameters == {"protocol": "few_shot", "method": "coop", "shots": 1}


def test_cli_rejects_unimplemented_method(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_notebook(tmp_path / "tiny.ipynb", parameters=PROTOCOL_PARAMETERS)
    args = parse_sweep_arguments(["tiny.ipynb", "--protocol", "base_to_novel", "--method", "promptsrc"])

    with pytest.raises(ValueError, match="method 'promptsrc' .* is marked not implemented"):
        args.handler(args)
    assert not (tmp_path / "runs").exists()


def test_cli_needs_datasets_without_protocol(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = parse_sweep_arguments(["tiny.ipynb", "--seed", "1"])

    with pytest.raises(ValueError, match="needs --dataset and --seed, or a --protocol"):
        args.handler(args)


# Sweeps that execute notebooks.


@pytest.mark.slow
def test_sweep_runs_every_task(full_sweep):
    report = full_sweep["report"]

    assert [outcome.outcome for outcome in report.outcomes] == ["ok"] * 4
    for task in full_sweep["tasks"]:
        run_dir = task.run_dir
        assert read_results(run_dir)["metrics"]["accuracy"] == expected_accuracy(task.dataset, task.seed)
        assert (run_dir / "device.txt").read_text() == ""  # CPU slots hide every GPU
    assert sorted(counter_lines(full_sweep["counter"])) == ["a 1", "a 2", "bb 1", "bb 2"]


@pytest.mark.slow
def test_sweep_report_file(full_sweep):
    saved = json.loads(full_sweep["report"].path.read_text())

    assert full_sweep["report"].path == full_sweep["root"] / "runs" / "sweeps" / "full.json"
    assert saved["status"] == "finished"
    assert saved["counts"]["ok"] == 4
    assert [task["task_id"] for task in saved["tasks"]] == ["tiny/a/seed1", "tiny/a/seed2", "tiny/bb/seed1", "tiny/bb/seed2"]
    assert all(Path(task["log"]).is_file() for task in saved["tasks"])


@pytest.mark.slow
def test_sweep_runs_two_tasks_at_once(full_sweep):
    intervals = [interval(outcome) for outcome in full_sweep["report"].outcomes]
    running_at_starts = [sum(1 for start, end in intervals if start <= moment < end) for moment, _ in intervals]

    assert max(running_at_starts) == 2


@pytest.mark.slow
def test_sweep_results_collected(full_sweep):
    table = collect_results(full_sweep["root"] / "runs", full_sweep["notebook"])

    assert list(zip(table["dataset"], table["seed"])) == [("a", 1), ("a", 2), ("bb", 1), ("bb", 2)]
    assert list(table["accuracy"]) == [11.0, 12.0, 21.0, 22.0]
    assert set(table["status"]) == {"ok"}


@pytest.mark.slow
def test_finished_sweep_is_skipped(full_sweep):
    report = run_sweep(full_sweep["tasks"], max_parallel=2, gpus=[], progress=False, cwd=full_sweep["root"])

    assert [outcome.outcome for outcome in report.outcomes] == ["skipped"] * 4
    assert len(counter_lines(full_sweep["counter"])) == 4


@pytest.mark.slow
def test_sweep_cli_skips_finished_runs(full_sweep, capsys, monkeypatch):
    monkeypatch.chdir(full_sweep["root"])
    args = parse_sweep_arguments([
        "tiny.ipynb", "--dataset", *DATASETS, "--seed", "1", "2", "-p", "counter_file", str(full_sweep["counter"]),
        "--kernel", KERNEL, "--gpus", "none", "--name", "cli",
    ])

    exit_code = args.handler(args)
    output = capsys.readouterr().out

    assert exit_code == 0
    assert output.count("skipped") == 4 + 1  # one line per run and the summary line
    assert "sweep cli: 0 ok, 4 skipped, 0 failed, 0 not started" in output
    assert (full_sweep["root"] / "runs" / "sweeps" / "cli.json").is_file()


@pytest.mark.slow
def test_killed_sweep_resumes_without_redoing_runs(tmp_path, full_sweep):
    notebook = write_notebook(tmp_path / "tiny.ipynb")
    counter, runs = tmp_path / "executions.txt", tmp_path / "runs"
    datasets = ["a"]  # two runs: the sweep is killed once the first has finished
    plan = (
        f"plan_sweep([{str(notebook)!r}], {datasets!r}, {SEEDS!r}, {{'counter_file': {str(counter)!r}}}, "
        f"{str(runs)!r}, kernel_name={KERNEL!r})"
    )
    script = textwrap.dedent(f"""
        from capt_lib.runs.sweep import plan_sweep, run_sweep
        run_sweep({plan}, max_parallel=1, gpus=["7"], progress=False, name="killed")
    """)
    run_dirs = [runs / "tiny" / dataset / f"seed{seed}" for dataset in datasets for seed in SEEDS]

    with open(tmp_path / "killed.log", "wb") as log:
        sweep = subprocess.Popen([sys.executable, "-c", script], cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT,
                                 start_new_session=True)
    deadline = time.monotonic() + 180
    while not any(run_status(run_dir) == "ok" for run_dir in run_dirs):
        assert sweep.poll() is None, (tmp_path / "killed.log").read_text()
        assert time.monotonic() < deadline, "no run finished within 180 s"
        time.sleep(0.1)
    os.killpg(sweep.pid, signal.SIGKILL)
    sweep.wait()

    finished = [run_dir for run_dir in run_dirs if run_status(run_dir) == "ok"]
    mtimes = {run_dir: (run_dir / "run.json").stat().st_mtime_ns for run_dir in finished}
    tasks = plan_sweep([notebook], datasets, SEEDS, {"counter_file": str(counter)}, runs, kernel_name=KERNEL)
    report = run_sweep(tasks, max_parallel=2, gpus=[], progress=False, name="resumed", cwd=tmp_path)

    skipped = [Path(outcome.run_dir) for outcome in report.outcomes if outcome.outcome == "skipped"]
    assert 1 <= len(finished) < len(run_dirs)
    assert skipped == finished
    assert {outcome.outcome for outcome in report.outcomes} <= {"skipped", "ok"}
    assert all((run_dir / "run.json").stat().st_mtime_ns == mtimes[run_dir] for run_dir in finished)
    lines = counter_lines(counter)
    assert all(lines.count(f"{run_dir.parts[-2]} {run_dir.name[4:]}") == 1 for run_dir in finished)
    assert (finished[0] / "device.txt").read_text() == "7"  # the killed sweep's GPU slot
    uninterrupted = {task.task_id: task.run_dir for task in full_sweep["tasks"]}
    for task in tasks:
        assert read_results(task.run_dir) == read_results(uninterrupted[task.task_id])


@pytest.mark.slow
def test_failing_task_is_recorded_and_others_run(tmp_path):
    notebook = write_notebook(tmp_path / "tiny.ipynb")
    tasks = plan_sweep([notebook], ["broken", "a"], [1], None, tmp_path / "runs", kernel_name=KERNEL)
    report = run_sweep(tasks, max_parallel=1, gpus=[], progress=False, name="failing", cwd=tmp_path)

    failed, passed = report.outcomes
    assert failed.outcome == "failed"
    assert failed.exit_code == 1
    assert failed.error == "RuntimeError: broken on purpose"
    assert passed.outcome == "ok"
    assert read_results(Path(passed.run_dir))["metrics"]["accuracy"] == expected_accuracy("a", 1)
    assert json.loads(report.path.read_text())["counts"]["failed"] == 1


@pytest.mark.slow
def test_stop_on_failure_starts_nothing_more(tmp_path):
    notebook = write_notebook(tmp_path / "tiny.ipynb")
    # An unregistered kernel makes `capt run` exit with 2 before any kernel starts, which keeps this test fast.
    tasks = [dataclasses.replace(task, kernel_name="no-such-kernel")
             for task in plan_sweep([notebook], ["a", "bb"], [1], None, tmp_path / "runs")]
    report = run_sweep(tasks, max_parallel=1, gpus=[], keep_going=False, progress=False, name="stop", cwd=tmp_path)

    assert [outcome.outcome for outcome in report.outcomes] == ["failed", "not started"]
    assert report.outcomes[0].exit_code == 2
    assert "no-such-kernel" in report.outcomes[0].error
    assert report.status == "stopped"


@pytest.mark.slow
def test_slurm_backend_through_submitit_debug_executor(tmp_path):
    from capt_lib.runs.slurm import SlurmSettings

    notebook = write_notebook(tmp_path / "tiny.ipynb")
    good, bad = plan_sweep([notebook], ["a", "bb"], [1], {"scale": 3.0}, tmp_path / "runs", kernel_name=KERNEL)
    bad = dataclasses.replace(bad, kernel_name="no-such-kernel")
    report = run_sweep(
        [good, bad], backend="slurm", slurm=SlurmSettings(gpus_per_task=0), slurm_cluster="debug",
        progress=False, name="slurm", cwd=tmp_path,
    )

    assert [outcome.outcome for outcome in report.outcomes] == ["ok", "failed"]
    assert report.outcomes[0].job_id is not None
    assert read_results(good.run_dir)["metrics"]["accuracy"] == expected_accuracy("a", 1, scale=3.0)
    assert report.outcomes[1].exit_code == 2
    assert json.loads(report.path.read_text())["options"]["slurm"]["gpus_per_task"] == 0
