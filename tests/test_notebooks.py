"""Execute every chapter notebook with a small parameter set, then check with nbval that a
second execution reproduces the stored outputs.

The small parameter sets use MiniCLIP's "smoke" recipe (pretrained in seconds, numbers
meaningless) so the whole file runs in a few minutes on a CPU. Progress bars are
switched off with TQDM_DISABLE, because their number of updates depends on timing.
Other varying outputs (times, paths, addresses) are rewritten by
tests/nbval_sanitize.cfg before the comparison.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from capt_lib.runs.papermill_runner import run_notebook

REPO = Path(__file__).resolve().parents[1]
SANITIZE = REPO / "tests" / "nbval_sanitize.cfg"

SMALL_PARAMETERS = {
    "01_confusion_discovery": {
        "pretrained": "smoke",
        "seeds": [1, 2],
        "coop_epochs": 5,
        "compare_pretrain_seed": 1,
    },
    "02_semantic_confusion_miner": {"pretrained": "smoke", "seeds": [1, 2], "epochs": 3, "ks": [1, 2]},
    "03_sample_confusion_miner": {"pretrained": "smoke", "seeds": [1, 2], "epochs": 3, "in_blocks": [-1]},
    "04_mgde": {"pretrained": "smoke", "seeds": [1, 2], "epochs": 3, "centres": [2]},
    "05_capt_vs_baselines": {"pretrained": "smoke", "seeds": [1, 2], "epochs": 3, "coop_epochs": 3},
    "06_base_to_novel": {"pretrained": "smoke", "epochs": 2, "coop_epochs": 5},
    "07_cross_dataset": {
        "pretrained": "smoke",
        "epochs": 2,
        "coop_epochs": 5,
        "targets": ["fashion_mnist_plain", "fashion_mnist_noisy"],
    },
    "08_domain_generalization": {
        "pretrained": "smoke",
        "epochs": 2,
        "coop_epochs": 5,
        "targets": ["fashion_mnist_blur", "fashion_mnist_negative"],
    },
    "09_few_shot": {"pretrained": "smoke", "epochs": 2, "coop_epochs": 5, "shots": 2},
    "10_cost": {
        "model_name": "ViT-S-32",
        "classes": 4,
        "shots": 2,
        "batch_size": 4,
        "repeats": 1,
        "recompute_repeats": 1,
        "retrieval_bank_size": 500,
        "retrieval_repeats": 2,
        "retrieval_loop_repeats": 1,
        "threads": 1,
    },
}


@pytest.fixture(scope="module")
def notebook_env(tmp_path_factory):
    """Environment shared by papermill and nbval: one cache and no progress bars."""
    cache = tmp_path_factory.mktemp("notebook-cache")
    env = {"CAPT_CACHE_DIR": str(cache), "TQDM_DISABLE": "1", "MPLBACKEND": "Agg"}
    previous = {name: os.environ.get(name) for name in env}
    os.environ.update(env)
    yield dict(os.environ)
    for name, value in previous.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


@pytest.mark.slow
@pytest.mark.parametrize("stem", sorted(SMALL_PARAMETERS))
def test_notebook_runs_and_reproduces(stem, tmp_path, notebook_env):
    notebook = REPO / "notebooks" / f"{stem}.ipynb"
    output_dir = tmp_path / stem

    record = run_notebook(notebook, output_dir, SMALL_PARAMETERS[stem], kernel_name="capt")
    assert record.status == "ok"
    assert (output_dir / "results.json").is_file()

    executed = output_dir / f"{stem}.ipynb"
    check = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "--nbval",
            "--nbval-kernel-name",
            "capt",
            "--nbval-sanitize-with",
            str(SANITIZE),
            "-p",
            "no:cacheprovider",
            "-q",
            str(executed),
        ],
        cwd=tmp_path,
        env=notebook_env,
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert check.returncode == 0, f"nbval found differences in {stem}:\n{check.stdout[-6000:]}\n{check.stderr[-2000:]}"


def test_every_notebook_has_small_parameters():
    stems = sorted(path.stem for path in (REPO / "notebooks").glob("*.ipynb"))
    assert sorted(SMALL_PARAMETERS) == stems
