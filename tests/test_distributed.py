"""Tests of data-parallel CAPT training: torchrun with 2 CPU processes (Gloo over 127.0.0.1).

The launched script and this test build the same tiny problem from the same module, written
to tmp_path, so the two-rank run can be compared with a single-process run.
"""

import importlib.util
import json
import os
import socket
import subprocess
import sys
import textwrap

import pytest
import torch

from capt_lib.training import distributed
from capt_lib.training.capt_trainer import predict_logits, train_capt
from capt_lib.training.distributed import DistInfo, init_distributed, shard_batch

CPU = torch.device("cpu")
LAUNCH_TIMEOUT_S = 120  # the whole torchrun launch usually takes under 30 s on 2 cores

SCRIPT = textwrap.dedent(
    '''
    """Train a tiny CAPT model with train_capt; under torchrun each rank saves its weights."""

    import dataclasses
    import json
    import sys
    from pathlib import Path

    import open_clip
    import torch
    import torch.nn.functional as F

    from capt_lib.backbones.base import Backbone
    from capt_lib.confusion.bank import build_confusion_bank
    from capt_lib.modules.adapter import DiffMannerAdapterConfig
    from capt_lib.modules.capt_model import CAPTConfig, CAPTModel
    from capt_lib.modules.mgde import MGDEConfig
    from capt_lib.training import distributed
    from capt_lib.training.capt_trainer import CAPTTrainConfig, SplitTensors, train_capt

    NUM_CLASSES = 4
    TRAIN_ROWS = 16
    # lam=0 and no load-balancing loss leave L_ori, a per-row mean, so two ranks must match one process.
    EXACT = CAPTTrainConfig(epochs=2, batch_size=8, lr=5e-3, lam=0.0, load_balance=0.0, seed=3)
    FULL = dataclasses.replace(EXACT, lam=1.0, load_balance=0.01)
    MODEL = CAPTConfig(
        adapter=DiffMannerAdapterConfig(heads=2),
        mgde=MGDEConfig(n_semantic_experts=2, n_sample_experts=1, n_centres=2),  # top-2 of 3 experts
    )


    def build_problem():
        """The tiny backbone and the train and val splits, identical in every process."""
        torch.manual_seed(0)
        clip = open_clip.model.CLIP(
            embed_dim=16,
            vision_cfg=dict(image_size=16, patch_size=4, width=32, layers=2, head_width=16),
            text_cfg=dict(context_length=8, vocab_size=100, width=32, heads=2, layers=1),
        )
        backbone = Backbone(clip.eval().requires_grad_(False), None, None, "tiny", None, "tiny", 16, 8, True)
        splits = []
        for seed, rows in ((1, TRAIN_ROWS), (2, 8)):
            images = torch.randn(rows, 3, 16, 16, generator=torch.Generator().manual_seed(seed))
            with torch.no_grad():
                tokens = backbone.visual_tokens(images)  # (rows, 17, 32)
                features = F.normalize(backbone.visual_head(tokens), dim=-1)  # (rows, 16)
            labels = torch.arange(rows) % NUM_CLASSES
            splits.append(SplitTensors(features, labels, torch.arange(rows) + 1000 * seed, tokens))
        return backbone, splits[0], splits[1]


    def build_model(backbone, train):
        generator = torch.Generator().manual_seed(7)
        text = F.normalize(torch.randn(NUM_CLASSES, 16, generator=generator), dim=-1)
        logits = backbone.model.logit_scale.exp() * train.features @ text.T
        names = tuple(f"c{i}" for i in range(NUM_CLASSES))
        bank = build_confusion_bank(logits, train.labels, train.features, train.sample_ids, names)
        common = F.normalize(torch.randn(NUM_CLASSES, NUM_CLASSES, 16, generator=generator), dim=-1)
        common = F.normalize(common + common.transpose(0, 1), dim=-1)
        difference = F.normalize(torch.randn(NUM_CLASSES, NUM_CLASSES, 16, generator=generator), dim=-1)
        torch.manual_seed(0)
        return CAPTModel(backbone, text, bank, common, difference, MODEL)


    def trainable_state(model):
        return {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}


    def main(out_dir):
        torch.set_num_threads(1)
        info = distributed.init_distributed(device="cpu")
        backbone, train, val = build_problem()
        record = {"rank": info.rank, "world_size": info.world_size, "backend": torch.distributed.get_backend()}
        for name, config in (("exact", EXACT), ("full", FULL)):
            model = build_model(backbone, train)
            # One folder per rank, so the test can see which ranks wrote a checkpoint.
            checkpoint_dir = out_dir / f"checkpoints_{name}_rank{info.rank}"
            result = train_capt(model, train, val, config, checkpoint_dir=checkpoint_dir)
            torch.save(trainable_state(model), out_dir / f"{name}_rank{info.rank}.pt")
            record[name] = result.history
        (out_dir / f"history_rank{info.rank}.json").write_text(json.dumps(record))
        distributed.destroy_distributed()


    if __name__ == "__main__":
        main(Path(sys.argv[1]))
    '''
)


def free_loopback_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def load_script(path):
    spec = importlib.util.spec_from_file_location("capt_ddp_script", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def two_rank_run(tmp_path_factory):
    """Launch the script on 2 CPU ranks through torchrun and return (script module, output folder)."""
    folder = tmp_path_factory.mktemp("ddp")
    script = folder / "train_tiny_capt.py"
    script.write_text(SCRIPT)
    out_dir = folder / "out"
    out_dir.mkdir()

    env = {key: value for key, value in os.environ.items() if key not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(GLOO_SOCKET_IFNAME="lo", OMP_NUM_THREADS="1")  # Gloo talks over the loopback interface only
    command = [
        sys.executable, "-m", "torch.distributed.run",
        "--nnodes", "1", "--nproc_per_node", "2",
        "--master_addr", "127.0.0.1", "--master_port", str(free_loopback_port()),
        str(script), str(out_dir),
    ]  # fmt: skip
    completed = subprocess.run(command, env=env, capture_output=True, text=True, timeout=LAUNCH_TIMEOUT_S)
    assert completed.returncode == 0, completed.stderr[-4000:]
    return load_script(script), out_dir


# ---- single-process helpers ---------------------------------------------------------------


def rank_info(rank: int, world_size: int) -> DistInfo:
    return DistInfo(rank=rank, world_size=world_size, local_rank=rank, device=CPU)


def test_shard_batch_single_process_keeps_batch():
    rows = torch.tensor([5, 2, 7])

    shard = shard_batch(rows, rank_info(0, 1))

    assert torch.equal(shard.rows, rows)
    assert shard.num_own == 3
    assert shard.loss_weight == 1.0


def test_shard_batch_splits_contiguously_with_weights():
    rows = torch.tensor([9, 4, 6, 1, 3])  # 5 rows over 2 ranks: 3 and 2

    first, second = (shard_batch(rows, rank_info(rank, 2)) for rank in (0, 1))

    assert first.rows.tolist() == [9, 4, 6]
    assert second.rows.tolist() == [1, 3]
    # DDP averages: (w0 * mean0 + w1 * mean1) / 2 must equal the mean over 5 rows.
    assert first.loss_weight == pytest.approx(3 * 2 / 5)
    assert second.loss_weight == pytest.approx(2 * 2 / 5)


def test_shard_batch_empty_rank_borrows_row():
    rows = torch.tensor([8, 3])  # 2 rows over 3 ranks: rank 2 has none

    shard = shard_batch(rows, rank_info(2, 3))

    assert shard.rows.tolist() == [8]
    assert shard.num_own == 0
    assert shard.loss_weight == 0.0


def test_init_distributed_without_torchrun_is_single_process(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)

    info = init_distributed(device="cpu")

    assert info == DistInfo(rank=0, world_size=1, local_rank=0, device=CPU)
    assert not torch.distributed.is_initialized()


def test_init_distributed_rejects_bad_environment(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(ValueError, match="WORLD_SIZE='two'"):
        init_distributed(device="cpu")

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("RANK", raising=False)
    with pytest.raises(ValueError, match="RANK is not set"):
        init_distributed(device="cpu")

    monkeypatch.setenv("RANK", "2")
    monkeypatch.setenv("LOCAL_RANK", "0")
    with pytest.raises(ValueError, match=r"RANK=2 is invalid"):
        init_distributed(device="cpu")


def test_single_process_helpers_are_no_ops():
    info = rank_info(0, 1)
    values = {"loss": 1.5, "correct": 3}
    model = torch.nn.Linear(2, 2)

    assert distributed.all_reduce_sums(values, info) is values
    assert distributed.wrap_model(model, info) is model
    assert distributed.current_dist_info(CPU) == info


# ---- two ranks through torchrun -----------------------------------------------------------


def test_two_ranks_use_gloo(two_rank_run):
    _, out_dir = two_rank_run
    records = [json.loads((out_dir / f"history_rank{rank}.json").read_text()) for rank in (0, 1)]

    assert [record["rank"] for record in records] == [0, 1]
    assert {record["world_size"] for record in records} == {2}
    assert {record["backend"] for record in records} == {"gloo"}


@pytest.mark.parametrize("name", ["exact", "full"])
def test_two_ranks_end_with_identical_weights(two_rank_run, name):
    _, out_dir = two_rank_run
    rank0 = torch.load(out_dir / f"{name}_rank0.pt")
    rank1 = torch.load(out_dir / f"{name}_rank1.pt")

    assert rank0.keys() == rank1.keys()
    for key in rank0:
        assert torch.isfinite(rank0[key]).all(), key
        torch.testing.assert_close(rank1[key], rank0[key], atol=0, rtol=0, msg=key)


def test_two_ranks_match_one_process_without_confuse_loss(two_rank_run):
    script, out_dir = two_rank_run
    backbone, train, val = script.build_problem()
    single = script.build_model(backbone, train)
    single_result = train_capt(single, train, val, script.EXACT)

    ranked = script.build_model(backbone, train)
    ranked.load_state_dict(torch.load(out_dir / "exact_rank0.pt"), strict=False)

    # Outputs are compared, not weights. Some gradients are zero in exact arithmetic
    # (attention key biases, a shift common to all router logits), so they hold only
    # rounding noise, which AdamW scales up to full-size steps that differ between runs
    # but leave the outputs unchanged.
    for split in (train, val):
        torch.testing.assert_close(predict_logits(ranked, split), predict_logits(single, split), atol=1e-4, rtol=1e-4)

    # Epoch metrics are summed over the ranks, so they equal the single process's.
    history = json.loads((out_dir / "history_rank0.json").read_text())["exact"]
    assert len(history) == len(single_result.history)
    for row, single_row in zip(history, single_result.history):
        assert row["L_ori"] == pytest.approx(single_row["L_ori"], rel=1e-4)
        assert row["train_accuracy"] == pytest.approx(single_row["train_accuracy"])
        assert row["val_accuracy"] == pytest.approx(single_row["val_accuracy"])


def test_two_ranks_with_confuse_loss_report_finite_metrics(two_rank_run):
    _, out_dir = two_rank_run
    records = [json.loads((out_dir / f"history_rank{rank}.json").read_text()) for rank in (0, 1)]

    for row in records[0]["full"]:
        assert all(torch.isfinite(torch.tensor(float(value))) for value in row.values())
        assert 0.0 <= row["train_accuracy"] <= 100.0
    assert records[0]["full"] == records[1]["full"]  # all-reduced metrics agree on every rank


def test_only_rank_zero_writes_checkpoints(two_rank_run):
    _, out_dir = two_rank_run

    for name in ("exact", "full"):
        assert (out_dir / f"checkpoints_{name}_rank0" / "last.pt").is_file()
        assert not (out_dir / f"checkpoints_{name}_rank1").exists()
