"""Time the batched Sample Confusion Miner against its per-image reference loop.

The bank is synthetic, sized like ImageNet's base split under the 16-shot protocol:
500 classes x 16 shots = 8,000 rows with 512-d random unit features. Each class has
three fixed confusable partners, and 30 % of the images are predicted as one of them.
A batch of 256 bank images (so the self-exclusion is active) requests k = 2 and k = 3
confusion pairs per image: its pseudo label with that class's partners. The script prints the
hardware, the torch version, the median times and the ratio, and checks that both
paths return identical rows. The target is a batched path at least 50x faster.

Run it from the repository root:

    .venv/bin/python benchmarks/retrieval.py --threads 2
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import torch

from capt_lib.confusion.sample_miner import SAMConfig, SampleConfusionMiner, retrieve_loop
from capt_lib.utils.io import atomic_write_json

NUM_CLASSES = 500
SHOTS = 16
EMBED_DIM = 512
BATCH_SIZE = 256
PARTNERS_PER_CLASS = 3
ERROR_RATE = 0.3


def synthetic_bank(seed: int) -> dict[str, torch.Tensor]:
    """Bank tensors with a fixed confusion structure: (8000, 512) features, labels, ids, partners."""
    generator = torch.Generator().manual_seed(seed)
    num_rows = NUM_CLASSES * SHOTS
    true_labels = torch.arange(NUM_CLASSES).repeat_interleave(SHOTS)  # (N,)

    shifts = [torch.randperm(NUM_CLASSES - 1, generator=generator)[:PARTNERS_PER_CLASS] + 1 for _ in range(NUM_CLASSES)]
    partners = (torch.arange(NUM_CLASSES)[:, None] + torch.stack(shifts)) % NUM_CLASSES  # (C, 3), never the class itself

    wrong = torch.rand(num_rows, generator=generator) < ERROR_RATE  # (N,)
    choice = torch.randint(0, PARTNERS_PER_CLASS, (num_rows,), generator=generator)  # (N,)
    pseudo_labels = torch.where(wrong, partners[true_labels, choice], true_labels)  # (N,)

    features = torch.nn.functional.normalize(torch.randn(num_rows, EMBED_DIM, generator=generator), dim=-1)
    return {
        "features": features,
        "true_labels": true_labels,
        "pseudo_labels": pseudo_labels,
        "sample_ids": torch.arange(num_rows),
        "partners": partners,
    }


def query_batch(bank: dict[str, torch.Tensor], k: int, seed: int) -> tuple[torch.Tensor, ...]:
    """Draw a batch of bank images with their pseudo labels and k partner classes of that pseudo label."""
    generator = torch.Generator().manual_seed(seed + 1)
    rows = torch.randperm(len(bank["sample_ids"]), generator=generator)[:BATCH_SIZE]  # (B,)
    pseudo = bank["pseudo_labels"][rows]  # (B,)
    partners = bank["partners"][pseudo, :k]  # (B, k), never equal to pseudo by construction
    return bank["features"][rows], pseudo, partners, bank["sample_ids"][rows]


def median_seconds(fn, repeats: int, device: torch.device) -> float:
    """Median wall time of ``fn()`` over ``repeats`` runs after one warm-up run."""
    fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def hardware(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.machine()} CPU ({os.cpu_count()} cores visible, {torch.get_num_threads()} torch threads)"


def benchmark(device: torch.device, bank: dict[str, torch.Tensor], mode: str, k: int, args) -> dict:
    miner = SampleConfusionMiner(
        bank["features"], bank["true_labels"], bank["pseudo_labels"], bank["sample_ids"], NUM_CLASSES,
        SAMConfig(mode=mode, seed=args.seed),
    ).to(device)
    queries, pseudo, partners, ids = (t.to(device) for t in query_batch(bank, k, args.seed))

    def batched():
        return miner.retrieve(queries, pseudo, partners, ids, generator=torch.Generator().manual_seed(args.seed))

    def looped():
        return retrieve_loop(miner, queries, pseudo, partners, ids, generator=torch.Generator().manual_seed(args.seed))

    result = batched()
    identical = torch.equal(result, looped())
    batched_s = median_seconds(batched, args.repeats, device)
    loop_s = median_seconds(looped, args.loop_repeats, device)
    return {
        "device": str(device),
        "hardware": hardware(device),
        "mode": mode,
        "k": k,
        "batched_ms": 1000 * batched_s,
        "loop_ms": 1000 * loop_s,
        "speedup": loop_s / batched_s,
        "identical": identical,
        "slots_with_retrieval": float((result >= 0).float().mean()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--repeats", type=int, default=20, help="timed runs of the batched path")
    parser.add_argument("--loop-repeats", type=int, default=3, help="timed runs of the reference loop")
    parser.add_argument("--seed", type=int, default=0, help="seed of the synthetic bank and the random mode")
    parser.add_argument("--output", default=None, help="optional JSON file for the results")
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    devices = [torch.device("cpu")]
    if torch.cuda.is_available():
        devices.append(torch.device("cuda"))
    bank = synthetic_bank(args.seed)

    print(f"torch {torch.__version__}, Python {platform.python_version()}")
    print(
        f"synthetic bank: {NUM_CLASSES} classes x {SHOTS} shots = {NUM_CLASSES * SHOTS} rows, E={EMBED_DIM}, "
        f"{int((bank['true_labels'] != bank['pseudo_labels']).sum())} confused rows; batch {BATCH_SIZE}"
    )
    print(f"{'hardware':<44} {'mode':<15} {'k':>2} {'batched ms':>11} {'loop ms':>9} {'speedup':>8} identical")
    results = []
    for device in devices:
        for mode in ("representative", "random"):
            for k in (2, 3):
                row = benchmark(device, bank, mode, k, args)
                results.append(row)
                print(
                    f"{row['hardware']:<44} {mode:<15} {k:>2} {row['batched_ms']:>11.2f} {row['loop_ms']:>9.1f} "
                    f"{row['speedup']:>7.0f}x {row['identical']}"
                )

    if args.output:
        atomic_write_json(args.output, {"torch": torch.__version__, "synthetic_bank": True, "results": results})


if __name__ == "__main__":
    main()
