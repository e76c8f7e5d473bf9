"""Pretrain MiniCLIP with two seeds and print the numbers its recipe must meet.

The downstream task follows the offline protocol. The few-shot pool is Fashion-MNIST
train images 50,000..57,999 and the test set is the 10,000 t10k images, both rendered
in ``DOWNSTREAM_STYLE`` (or ``--style``). Base classes are labels 0-4. For each seed
the script reports:

1. zero-shot 10-way test accuracy with the prompt "a photo of a {}." (target 55-80 %);
2. the top confusion pairs of that zero-shot run, and their overlap across seeds;
3. a 16-shot linear probe on the base classes (mean over few-shot seeds 1-3, as in
   notebook 01) against 5-way zero-shot on base (target: the probe wins by at least
   5 points);
4. the pretraining time (target: at most 5 minutes on 2 CPU cores).

Run it from the repository root, for example:

    time .venv/bin/python benchmarks/miniclip_recipe.py --fresh --threads 2
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import tempfile
import time

import numpy as np
import torch

from capt_lib.backbones.miniclip import RECIPES, images_to_tensor, load_miniclip
from capt_lib.data.fashion_mnist import load_fashion_mnist
from capt_lib.data.fewshot import sample_few_shot
from capt_lib.data.splits import split_base_novel
from capt_lib.data.styles import DOWNSTREAM_STYLE, STYLE_CAPTION_WORDS, STYLES, stylize
from capt_lib.evaluation.linear_probe import linear_probe_accuracy

POOL = (50_000, 58_000)  # downstream few-shot pool: Fashion-MNIST train images [start, end)
ZERO_SHOT_TEMPLATE = "a photo of a {}."
SHOTS = 16
PROBE_SEEDS = (1, 2, 3)  # few-shot seeds of the probe, as in notebook 01


def downstream_splits(style: str):
    """Return the downstream (pool, test) datasets rendered in ``style``."""
    train = load_fashion_mnist("train")
    pool = train.subset(np.arange(*POOL))
    test = load_fashion_mnist("test")
    return stylize(pool, style), stylize(test, style)


@torch.no_grad()
def image_features(backbone, images: np.ndarray, batch_size: int = 1000) -> torch.Tensor:
    """Encode uint8 images (N, H, W) into L2-normalised features (N, embed_dim)."""
    chunks = []
    for start in range(0, len(images), batch_size):
        x = images_to_tensor(images[start : start + batch_size]).to(backbone.device)  # (B, 3, H, W)
        chunks.append(backbone.model.encode_image(x, normalize=True).cpu())
    return torch.cat(chunks)


def zero_shot_predictions(backbone, features: torch.Tensor, classnames, template: str) -> torch.Tensor:
    text = backbone.encode_text([template.format(name) for name in classnames]).cpu()  # (C, embed_dim)
    return (features @ text.T).argmax(dim=-1)


def confusion_matrix(labels: np.ndarray, predictions: np.ndarray, num_classes: int) -> np.ndarray:
    """Count matrix N[true, predicted] with the diagonal set to zero."""
    matrix = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(matrix, (labels, predictions), 1)
    np.fill_diagonal(matrix, 0)
    return matrix


def top_unordered_pairs(matrix: np.ndarray, k: int) -> list[tuple[int, int, int]]:
    """Return the k unordered class pairs with the most confusions in either direction, as (a, b, count)."""
    n = len(matrix)
    pairs = [(a, b, int(matrix[a, b] + matrix[b, a])) for a in range(n) for b in range(a + 1, n)]
    return sorted(pairs, key=lambda pair: (-pair[2], pair[0], pair[1]))[:k]


def evaluate(backbone, style: str) -> dict:
    """Measure zero-shot, confusion pairs and the base-class linear probe on the downstream task."""
    pool, test = downstream_splits(style)
    test_features = image_features(backbone, test.images)
    predictions = zero_shot_predictions(backbone, test_features, test.classnames, ZERO_SHOT_TEMPLATE).numpy()
    matrix = confusion_matrix(test.labels, predictions, test.num_classes)

    pool_base, test_base = split_base_novel(pool, test, part="base")
    base_features = image_features(backbone, test_base.images)
    base_predictions = zero_shot_predictions(backbone, base_features, test_base.classnames, ZERO_SHOT_TEMPLATE)
    zero_shot_base = float((base_predictions.numpy() == test_base.labels).mean())
    probe_by_seed = {}
    for seed in PROBE_SEEDS:
        shots = sample_few_shot(pool_base, SHOTS, seed=seed)
        probe_by_seed[seed] = linear_probe_accuracy(
            image_features(backbone, shots.images),
            torch.from_numpy(shots.labels),
            base_features,
            torch.from_numpy(test_base.labels),
            test_base.num_classes,
            seed=seed,
        )

    style_prompt = f"a {STYLE_CAPTION_WORDS[style]} photo of a {{}}." if STYLE_CAPTION_WORDS[style] else ZERO_SHOT_TEMPLATE
    style_predictions = zero_shot_predictions(backbone, test_features, test.classnames, style_prompt).numpy()
    return {
        "zero_shot": float((predictions == test.labels).mean()),
        "zero_shot_style_prompt": float((style_predictions == test.labels).mean()),
        "top_pairs": top_unordered_pairs(matrix, 5),
        "zero_shot_base": zero_shot_base,
        "linear_probe_base": float(np.mean(list(probe_by_seed.values()))),
        "linear_probe_base_by_seed": probe_by_seed,
    }


def pair_names(pairs, classnames) -> list[str]:
    return [f"{classnames[a]} / {classnames[b]} ({count})" for a, b, count in pairs]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--recipe", default="default", choices=sorted(RECIPES), help="MiniCLIP recipe name")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="override one recipe field, e.g. --set style_word_prob=0.97 (repeatable)",
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="pretraining seeds")
    parser.add_argument("--cache-dir", default=None, help="cache root (default: $CAPT_CACHE_DIR or runs/cache)")
    parser.add_argument("--fresh", action="store_true", help="pretrain into a temporary cache, ignoring cached weights")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--style", default=DOWNSTREAM_STYLE, choices=STYLES, help="style of the downstream images")
    parser.add_argument("--all-styles", action="store_true", help="also report zero-shot accuracy on every style")
    parser.add_argument("--output", default=None, help="write the results to this JSON file")
    args = parser.parse_args()

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    cache_dir = tempfile.mkdtemp(prefix="miniclip-bench-") if args.fresh else args.cache_dir
    classnames = load_fashion_mnist("test").classnames

    recipe = override_recipe(RECIPES[args.recipe], args.overrides)
    results = {"recipe": args.recipe, "overrides": args.overrides, "downstream_style": args.style, "threads": torch.get_num_threads(), "seeds": {}}
    for seed in args.seeds:
        load_before = os.getloadavg()[0]
        start = time.perf_counter()
        backbone = load_miniclip(recipe, seed=seed, cache_dir=cache_dir)
        wall = time.perf_counter() - start
        result = evaluate(backbone, args.style)
        result.update(
            pretrain_seconds=backbone.info["pretrain_seconds"],
            pretrain_cpu_seconds=backbone.info["pretrain_cpu_seconds"],
            torch_num_threads=backbone.info["torch_num_threads"],
            load_seconds=round(wall, 2),
            load_average=[round(load_before, 2), round(os.getloadavg()[0], 2)],
            param_count=backbone.info["param_count"],
        )
        if args.all_styles:
            result["zero_shot_by_style"] = {style: evaluate_zero_shot(backbone, style) for style in STYLES}
        results["seeds"][seed] = result

        print(
            f"\nseed {seed}: {result['param_count']:,} parameters, pretrained in {result['pretrain_seconds']:.0f} s wall, "
            f"{result['pretrain_cpu_seconds']:.0f} s CPU with {result['torch_num_threads']} threads "
            f"(1-min load average {result['load_average'][0]} before, {result['load_average'][1]} after)"
        )
        print(f"  1. zero-shot 10-way on {args.style} test: {100 * result['zero_shot']:.2f} % "
              f"(style-naming prompt: {100 * result['zero_shot_style_prompt']:.2f} %)")
        print(f"  2. top confusion pairs: {pair_names(result['top_pairs'], classnames)}")
        print(f"  3. base 5-way: zero-shot {100 * result['zero_shot_base']:.2f} %, "
              f"{SHOTS}-shot linear probe {100 * result['linear_probe_base']:.2f} % "
              f"(margin {100 * (result['linear_probe_base'] - result['zero_shot_base']):+.2f} points; by few-shot seed: "
              + ", ".join(f"{s} {100 * a:.2f} %" for s, a in result["linear_probe_base_by_seed"].items()) + ")")
        if args.all_styles:
            print("  zero-shot by style: " + ", ".join(f"{s} {100 * a:.1f} %" for s, a in result["zero_shot_by_style"].items()))

    if len(args.seeds) >= 2:
        first, second = (results["seeds"][s]["top_pairs"] for s in args.seeds[:2])
        for k in (3, 5):
            overlap = {p[:2] for p in first[:k]} & {p[:2] for p in second[:k]}
            results[f"top{k}_overlap"] = len(overlap)
            print(f"top-{k} unordered confusion pairs shared by seeds {args.seeds[0]} and {args.seeds[1]}: {len(overlap)} of {k}")

    if args.output:
        with open(args.output, "w", encoding="utf-8") as f:
            json.dump(results, f, indent=2)


def override_recipe(recipe, overrides: list[str]):
    """Return ``recipe`` with each "field=value" in ``overrides`` applied, cast to the field's type."""
    changes = {}
    for item in overrides:
        field, sep, value = item.partition("=")
        if not sep or not hasattr(recipe, field):
            raise SystemExit(f"--set {item!r}: expected FIELD=VALUE with a MiniCLIPRecipe field")
        current = getattr(recipe, field)
        if not isinstance(current, (int, float, str)):
            raise SystemExit(f"--set {item!r}: field {field} is not a number or string")
        changes[field] = type(current)(value)
    return dataclasses.replace(recipe, **changes)


def evaluate_zero_shot(backbone, style: str) -> float:
    """Return the zero-shot 10-way test accuracy with the plain prompt on images in ``style``."""
    _, test = downstream_splits(style)
    features = image_features(backbone, test.images)
    predictions = zero_shot_predictions(backbone, features, test.classnames, ZERO_SHOT_TEMPLATE).numpy()
    return float((predictions == test.labels).mean())


if __name__ == "__main__":
    main()
