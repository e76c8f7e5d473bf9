"""Measure ViT-B-16 throughput on one GPU: the frozen backbone forward and CAPT training.

The script prints one JSON line with two numbers, in images per second:

* ``backbone_images_per_s``: the frozen image tower (``visual_tokens`` + ``visual_head``)
  under no_grad and autocast, on random pixels at the model's input size;
* ``capt_train_images_per_s``: one epoch of ``train_capt`` over the tokens that the timed
  backbone batches produced, with the default ``CAPTConfig`` (the adapter after the
  last block, so the tokens are cached). Each step includes SAM retrieval, the forward
  and backward pass over the batch and its retrieved images, and the optimizer step.

The weights are random: the script writes them with ``save_random_checkpoint`` (or reads
a file passed with ``--checkpoint``) and loads them through ``load_backbone``, the path
that real weights take. The numbers measure speed only, and the JSON records
``"weights": "random weights"``. With the defaults (batch 256, 10 timed batches) a GPU
run should end within about two minutes, most of it spent writing and loading the weights.
NOTE: that is an estimate, because the script has only run on CPU so far (the smoke test
in tests/test_vit_b16_smoke.py), and its CUDA path is untested.

    python scripts/gpu_check.py                                      # GPU, bf16, batch 256
    python scripts/gpu_check.py --device cpu --batch 2 --steps 1 --warmup 0 --precision fp32
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import sys
import tempfile
import time
from pathlib import Path

import open_clip
import torch
import torch.nn.functional as F

from capt_lib.backbones.base import Backbone
from capt_lib.backbones.loading import BackboneConfig, load_backbone, save_random_checkpoint
from capt_lib.confusion.bank import build_confusion_bank
from capt_lib.modules.capt_model import CAPTConfig, CAPTModel
from capt_lib.training.capt_trainer import CAPTTrainConfig, SplitTensors, train_capt
from capt_lib.utils.device import PRECISIONS, autocast, resolve_device, resolve_precision

logger = logging.getLogger("gpu_check")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="ViT-B-16", help="open_clip architecture (default: ViT-B-16)")
    parser.add_argument(
        "--checkpoint", default=None,
        help="weights file to load; by default random weights are written to a temporary folder",
    )  # fmt: skip
    parser.add_argument("--device", default="auto", help="'auto' (CUDA when present), 'cuda', 'cuda:N' or 'cpu'")
    parser.add_argument("--precision", default="bf16", choices=sorted(PRECISIONS), help="autocast dtype")
    parser.add_argument("--batch", type=int, default=256, help="images per batch")
    parser.add_argument("--steps", type=int, default=10, help="timed batches per measurement")
    parser.add_argument("--warmup", type=int, default=2, help="untimed batches before the backbone timing")
    parser.add_argument("--classes", type=int, default=10, help="classes of the synthetic CAPT task")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights, pixels and labels")
    args = parser.parse_args(argv)

    for name in ("batch", "steps", "classes"):
        if getattr(args, name) < 1:
            parser.error(f"--{name}={getattr(args, name)} is invalid; it must be at least 1")
    if args.warmup < 0:
        parser.error(f"--warmup={args.warmup} is invalid; it must be at least 0")
    if args.classes < 2:
        parser.error(f"--classes={args.classes} is invalid; CAPT needs at least 2 classes")
    return args


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_backbone(backbone: Backbone, args, device: torch.device, precision: str) -> tuple[float, SplitTensors]:
    """Time the frozen image tower; return images per second and the timed batches' outputs."""
    generator = torch.Generator(device=device).manual_seed(args.seed)
    shape = (args.batch, 3, backbone.image_size, backbone.image_size)

    def forward() -> tuple[torch.Tensor, torch.Tensor]:
        images = torch.randn(shape, generator=generator, device=device)  # (B, 3, S, S)
        with torch.no_grad(), autocast(device, precision):
            tokens = backbone.visual_tokens(images)  # (B, 1 + HW, width)
            features = backbone.visual_head(tokens)  # (B, embed_dim)
        return tokens, features

    for _ in range(args.warmup):
        forward()
    synchronize(device)

    token_batches, feature_batches = [], []
    start = time.perf_counter()
    for _ in range(args.steps):
        tokens, features = forward()
        token_batches.append(tokens)
        feature_batches.append(features)
    synchronize(device)
    elapsed = time.perf_counter() - start

    rows = args.batch * args.steps
    split = SplitTensors(
        features=F.normalize(torch.cat(feature_batches).float(), dim=-1),  # (N, embed_dim)
        labels=torch.arange(rows) % args.classes,  # (N,) on the CPU, as the trainer indexes it
        sample_ids=torch.arange(rows),  # (N,)
        tokens=torch.cat(token_batches).float(),  # (N, 1 + HW, width)
    )
    return rows / elapsed, split


def build_capt_model(backbone: Backbone, train: SplitTensors, args, device: torch.device) -> CAPTModel:
    """Build a default CAPT model for a synthetic task: random class texts and pair prompts, a bank of its confusions."""
    generator = torch.Generator().manual_seed(args.seed)
    embed_dim = backbone.embed_dim
    text = F.normalize(torch.randn(args.classes, embed_dim, generator=generator), dim=-1)  # (C, E)
    common = F.normalize(torch.randn(args.classes, args.classes, embed_dim, generator=generator), dim=-1)
    common = F.normalize(common + common.transpose(0, 1), dim=-1)  # (C, C, E), symmetric in the pair
    difference = F.normalize(torch.randn(args.classes, args.classes, embed_dim, generator=generator), dim=-1)

    features = train.features.cpu()
    logits = backbone.model.logit_scale.detach().exp().cpu() * features @ text.T  # (N, C)
    names = tuple(f"class {i}" for i in range(args.classes))
    bank = build_confusion_bank(logits, train.labels, features, train.sample_ids, names)

    torch.manual_seed(args.seed)
    model = CAPTModel(backbone, text.to(device), bank, common.to(device), difference.to(device), CAPTConfig())
    return model.to(device)


def time_capt(backbone: Backbone, train: SplitTensors, args, device: torch.device, precision: str) -> float:
    """Time one epoch of train_capt over ``train``, after an untimed epoch over one batch."""
    config = CAPTTrainConfig(epochs=1, batch_size=args.batch, precision=precision, seed=args.seed)
    val = SplitTensors(train.features[:1], train.labels[:1], train.sample_ids[:1], train.tokens[:1])  # 1 row

    warmup_rows = torch.arange(min(args.batch, len(train)))
    warmup = SplitTensors(
        train.features[warmup_rows], train.labels[warmup_rows], train.sample_ids[warmup_rows], train.tokens[warmup_rows]
    )
    warmup_model = build_capt_model(backbone, warmup, args, device)
    train_capt(warmup_model, warmup, val, config)

    model = build_capt_model(backbone, train, args, device)
    synchronize(device)
    start = time.perf_counter()
    train_capt(model, train, val, config)
    synchronize(device)
    return len(train) / (time.perf_counter() - start)


def run(args: argparse.Namespace) -> dict:
    started = time.perf_counter()
    device = resolve_device(args.device)
    precision = resolve_precision(args.precision, device)

    with tempfile.TemporaryDirectory(prefix="capt-gpu-check-") as folder:
        checkpoint = args.checkpoint
        if checkpoint is None:
            checkpoint = save_random_checkpoint(args.model, Path(folder) / f"{args.model}-random.safetensors", args.seed)
        backbone = load_backbone(BackboneConfig(args.model, checkpoint=str(checkpoint), precision=precision), device)
    load_s = time.perf_counter() - started

    backbone_rate, train = time_backbone(backbone, args, device, precision)
    capt_rate = time_capt(backbone, train, args, device, precision)

    return {
        "weights": "random weights" if backbone.random_weights else f"weights from {checkpoint}",
        "model": args.model,
        "image_size": backbone.image_size,
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor(),
        "precision": precision,
        "batch": args.batch,
        "steps": args.steps,
        "backbone_images_per_s": round(backbone_rate, 2),
        "capt_train_images_per_s": round(capt_rate, 2),
        "peak_memory_gib": _peak_memory_gib(device),
        "load_s": round(load_s, 2),
        "total_s": round(time.perf_counter() - started, 2),
        "torch": torch.__version__,
        "open_clip": open_clip.__version__,
    }


def _peak_memory_gib(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    return round(torch.cuda.max_memory_allocated(device) / 2**30, 2)


def main(argv: list[str] | None = None) -> dict:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    result = run(parse_args(argv))
    print(json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    main()
