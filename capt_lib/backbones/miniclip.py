"""MiniCLIP: a small open_clip ``CLIP`` that capt pretrains itself on Fashion-MNIST, offline.

The model is an ordinary ``open_clip.model.CLIP`` built from dict configs (a ViT on
28 x 28 images and a causal text transformer), so every later stage treats it like a
web-pretrained CLIP. It is pretrained contrastively (open_clip's ``ClipLoss``) on
Fashion-MNIST training images 0..49,999 only. Images 50,000..59,999 and the test split
stay unseen, as a benchmark is unseen by web-scale pretraining.

Each pretraining image is shown in a style drawn from the recipe (mostly "plain") and
gets a caption that names its class and, with probability ``style_word_prob``, its
style. Some captions add garment attributes ("a blurred photo of a coat with buttons
and a collar."). The downstream task uses ``capt_lib.data.styles.DOWNSTREAM_STYLE``,
which a plain prompt such as "a photo of a coat." does not name, so zero-shot accuracy
leaves room for prompt tuning.

Weights are cached under ``<cache_dir>/miniclip/<key>``, where the key hashes the
recipe, the seed, the caption tables and ``MINICLIP_CODE_VERSION``.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import open_clip
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from capt_lib.backbones.base import Backbone
from capt_lib.backbones.tokenizer import CompactTokenizer
from capt_lib.data.fashion_mnist import FASHION_MNIST_CLASSNAMES, load_fashion_mnist
from capt_lib.data.styles import STYLE_CAPTION_WORDS, apply_style
from capt_lib.utils.cache import content_key, file_sha256, resolve_cache_dir
from capt_lib.utils.device import resolve_device
from capt_lib.utils.io import atomic_write, atomic_write_json, read_json

logger = logging.getLogger(__name__)

# Bump when a change to this module changes the weights that a recipe and seed produce.
MINICLIP_CODE_VERSION = "1"
MINICLIP_FORMAT = "capt-miniclip/1"
PRETRAIN_POOL_SIZE = 50_000  # pretraining may use Fashion-MNIST train images 0..49,999 only
PIXEL_MEAN = 0.5  # grey levels are scaled to [0, 1], then normalised with this mean and std
PIXEL_STD = 0.5


@dataclass(frozen=True)
class MiniCLIPRecipe:
    """Everything that determines a pretrained MiniCLIP except the seed."""

    # Architecture
    embed_dim: int = 128  # joint image-text embedding size
    image_size: int = 28  # input side in pixels (Fashion-MNIST's native size)
    patch_size: int = 7  # ViT patch side (28 / 7 gives a 4 x 4 patch grid)
    vision_width: int = 128  # ViT token width
    vision_layers: int = 4  # ViT blocks
    vision_head_width: int = 32  # width per attention head (heads = width / head_width)
    text_width: int = 128  # text transformer width
    text_heads: int = 4  # text attention heads
    text_layers: int = 2  # text transformer blocks
    context_length: int = 32  # text tokens including start and end of text
    # Pretraining data
    num_images: int = 50_000  # Fashion-MNIST train images 0..num_images-1 (at most 50,000)
    styles: tuple[tuple[str, float], ...] = (  # (style, probability) drawn per image and epoch
        ("plain", 0.55),
        ("negative", 0.15),
        ("blur", 0.15),
        ("upside_down", 0.15),
    )
    # Probability that a non-plain image's caption names its style (else it reads as plain).
    # Plain-prompt zero-shot accuracy on upside-down images falls as this nears 1, and the
    # 16-shot base linear probe gains more over zero-shot. Measured with
    # benchmarks/miniclip_recipe.py (2 epochs, pretraining seeds 0 and 1, 2 CPU threads,
    # probe gain as the mean over few-shot seeds 1-3):
    #   0.95: zero-shot 73 % and 72 %, probe gain 4.5 and 7.7 points (few-shot seed 1 only).
    #         The top-3 pairs of both seeds were identical.
    #   0.96: zero-shot 70 % and 68 %, probe gain 7.3 and 8.3 points. 4 of the top-5 pairs match.
    #   0.97: zero-shot 69 % and 65 %, probe gain 10.9 and 12.3 points. 4 of the top-5 pairs match.
    #   1.0: zero-shot 65 % and 50 %, so the result depends too much on the seed.
    style_word_prob: float = 0.96
    attribute_caption_prob: float = 0.3  # probability that a caption adds garment attributes
    # Optimisation
    epochs: int = 2  # passes over the pretraining images
    batch_size: int = 256  # images (and captions) per contrastive batch
    lr: float = 2e-3  # AdamW peak learning rate
    weight_decay: float = 0.1  # AdamW weight decay on weight matrices only, not on biases, norms or embeddings
    warmup_fraction: float = 0.05  # share of the steps with a linear learning-rate warmup, then cosine decay
    init_logit_scale: float = math.log(1 / 0.07)  # initial log inverse temperature, as in CLIP

    def __post_init__(self):
        if not 0 < self.num_images <= PRETRAIN_POOL_SIZE:
            raise ValueError(
                f"MiniCLIPRecipe.num_images={self.num_images} must lie in 1..{PRETRAIN_POOL_SIZE}: "
                "later Fashion-MNIST train images form the downstream pool and must stay unseen"
            )
        unknown = [style for style, _ in self.styles if style not in STYLE_CAPTION_WORDS]
        if unknown:
            raise ValueError(f"MiniCLIPRecipe.styles has unknown styles {unknown}; choose from {list(STYLE_CAPTION_WORDS)}")
        probs = [p for _, p in self.styles]
        if any(p < 0 for p in probs) or not math.isclose(sum(probs), 1.0, abs_tol=1e-6):
            raise ValueError(f"MiniCLIPRecipe.styles probabilities must be non-negative and sum to 1, got {probs}")
        for name in ("style_word_prob", "attribute_caption_prob", "warmup_fraction"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"MiniCLIPRecipe.{name}={getattr(self, name)} must lie in [0, 1]")
        if self.epochs < 1:
            raise ValueError(f"MiniCLIPRecipe.epochs={self.epochs} must be at least 1")
        if self.vision_width % self.vision_head_width or self.text_width % self.text_heads:
            raise ValueError(
                f"MiniCLIPRecipe: vision_width={self.vision_width} must be a multiple of "
                f"vision_head_width={self.vision_head_width}, and text_width={self.text_width} "
                f"a multiple of text_heads={self.text_heads}"
            )
        if self.image_size % self.patch_size:
            raise ValueError(
                f"MiniCLIPRecipe.image_size={self.image_size} must be a multiple of patch_size={self.patch_size}"
            )
        if self.num_images < self.batch_size:
            raise ValueError(
                f"MiniCLIPRecipe.batch_size={self.batch_size} exceeds num_images={self.num_images}, "
                "so no full batch can be formed"
            )


RECIPES: dict[str, MiniCLIPRecipe] = {
    # The real backbone of the offline notebooks.
    "default": MiniCLIPRecipe(),
    # A tiny model for tests and notebook smoke runs. Its accuracy is not meaningful.
    "smoke": MiniCLIPRecipe(
        embed_dim=32,
        vision_width=32,
        vision_layers=1,
        vision_head_width=16,
        text_width=32,
        text_heads=2,
        text_layers=1,
        num_images=2_048,
        epochs=1,
        batch_size=128,
    ),
}


# Captions

# Caption patterns. {style} is the style word or empty, and {attributes} a garment phrase.
CAPTION_TEMPLATES = (
    "a {style} photo of a {classname}.",
    "a {style} picture of a {classname}.",
    "a {style} image of the {classname}.",
    "a {classname} in a {style} photo.",
)
ATTRIBUTE_TEMPLATES = (
    "a {style} photo of a {classname} with {attributes}.",
    "a {style} photo of a {classname}, which has {attributes}.",
)

# Garment attributes that most images of a class show. Confusable classes share some.
CLASS_ATTRIBUTES = {
    "T-shirt/top": ("short sleeves", "a round neck", "no collar", "no buttons"),
    "Trouser": ("two long legs", "a waist band", "no sleeves", "a long length"),
    "Pullover": ("long sleeves", "a round neck", "no buttons", "knitted fabric"),
    "Dress": ("a long skirt", "a narrow waist", "no legs", "no collar"),
    "Coat": ("long sleeves", "buttons", "a collar", "a zip"),
    "Sandal": ("straps", "an open toe", "a flat sole", "no laces"),
    "Shirt": ("a collar", "buttons", "sleeves", "a pocket"),
    "Sneaker": ("laces", "a low cut", "a rubber sole", "a closed toe"),
    "Bag": ("a handle", "a strap", "a zip", "no sleeves"),
    "Ankle boot": ("a heel", "a high ankle", "a closed toe", "a thick sole"),
}

# Words kept in the vocabulary for commonality and difference prompts about garment
# pairs although the captions do not use them all.
# NOTE: words that no caption uses keep their randomly initialised embedding rows.
EXTRA_VOCABULARY = (
    "both have has differs differ from while whereas but not is are without the an its their than "
    "more less longer shorter wider narrower higher lower open closed long short sleeve collar button "
    "heel lace laces strap handle handles leg zip zipper hood toe toes ankle sole waist neck body "
    "upper lower worn on over feet foot shoulder shoulders shape length fabric top bottom front back "
    "opening covers cover shoe shoes garment garments clothing footwear loose tight thick thin soft "
    "flat high low round one two piece separate usually often can be of to for at by or as like "
    "similar same different unlike each other also only pocket pockets skirt hem cuffs belt buckle "
    "rubber leather cotton wool warm outer layer carried hand arm arms hips knees full half boot "
    "boots sandal sandals sneaker sneakers bag bags coat coats shirt shirts pullover pullovers dress "
    "dresses trouser trousers t-shirt tops sleeveless hooded buttoned laced heeled strapped , . ; : ' !"
)


def _fill(template: str, style_word: str, classname: str, attributes: str = "") -> str:
    text = template.format(style=style_word, classname=classname, attributes=attributes)
    return " ".join(text.split())  # drop the double space an empty style word leaves


def _attribute_phrases(classname: str) -> list[str]:
    # Single attributes and ordered pairs of different attributes ("buttons and a collar").
    attributes = CLASS_ATTRIBUTES[classname]
    pairs = [f"{a} and {b}" for a in attributes for b in attributes if a != b]
    return [*attributes, *pairs]


def caption_corpus(styles: list[str], classnames=FASHION_MNIST_CLASSNAMES) -> list[tuple[str, int, bool, str]]:
    """List every pretraining caption as (style, label, has attributes, text)."""
    corpus = []
    for style in styles:
        word = STYLE_CAPTION_WORDS[style]
        for label, classname in enumerate(classnames):
            for template in CAPTION_TEMPLATES:
                corpus.append((style, label, False, _fill(template, word, classname)))
            for template in ATTRIBUTE_TEMPLATES:
                for phrase in _attribute_phrases(classname):
                    corpus.append((style, label, True, _fill(template, word, classname, phrase)))
    return corpus


def build_tokenizer(recipe: MiniCLIPRecipe) -> CompactTokenizer:
    """Build the compact tokenizer over every caption of every known style plus ``EXTRA_VOCABULARY``.

    The vocabulary covers all styles, not only the recipe's, so prompts that name any
    style stay in vocabulary.
    """
    texts = [text for *_, text in caption_corpus(list(STYLE_CAPTION_WORDS))]
    return CompactTokenizer.from_corpus(texts, recipe.context_length, extra_words=EXTRA_VOCABULARY.split())


@dataclass(frozen=True)
class _CaptionTable:
    """All captions a pretraining image can get, tokenized once."""

    tokens: torch.Tensor  # (num_captions, context_length) token ids
    without_attributes: dict[tuple[str, int], np.ndarray]  # (style, label) -> rows of short captions
    with_attributes: dict[tuple[str, int], np.ndarray]  # (style, label) -> rows of attribute captions


def _caption_table(tokenizer: CompactTokenizer) -> _CaptionTable:
    corpus = caption_corpus(list(STYLE_CAPTION_WORDS))
    tokens = tokenizer([text for *_, text in corpus])  # (num_captions, context_length)

    short, long = {}, {}
    for row, (style, label, has_attributes, _) in enumerate(corpus):
        target = long if has_attributes else short
        target.setdefault((style, label), []).append(row)
    as_arrays = lambda table: {k: np.asarray(v, dtype=np.int64) for k, v in table.items()}  # noqa: E731
    return _CaptionTable(tokens, as_arrays(short), as_arrays(long))


def _sample_captions(
    table: _CaptionTable,
    styles: list[str],
    labels: np.ndarray,
    recipe: MiniCLIPRecipe,
    rng: np.random.Generator,
) -> np.ndarray:
    """Draw one caption row per image from its (caption style, label) group, uniformly."""
    names_style = rng.random(len(labels)) < recipe.style_word_prob
    use_attributes = rng.random(len(labels)) < recipe.attribute_caption_prob
    draws = rng.random(len(labels))

    rows = np.empty(len(labels), dtype=np.int64)
    for i, (style, label) in enumerate(zip(styles, labels.tolist())):
        caption_style = style if names_style[i] else "plain"
        group = table.with_attributes if use_attributes[i] else table.without_attributes
        choices = group[(caption_style, label)]
        rows[i] = choices[int(draws[i] * len(choices))]
    return rows


# Model and image transform


def model_config(recipe: MiniCLIPRecipe, vocab_size: int) -> dict:
    """Return the keyword arguments of ``open_clip.model.CLIP`` for ``recipe``."""
    return {
        "embed_dim": recipe.embed_dim,
        "vision_cfg": {
            "image_size": recipe.image_size,
            "patch_size": recipe.patch_size,
            "width": recipe.vision_width,
            "layers": recipe.vision_layers,
            "head_width": recipe.vision_head_width,
        },
        "text_cfg": {
            "context_length": recipe.context_length,
            "vocab_size": vocab_size,
            "width": recipe.text_width,
            "heads": recipe.text_heads,
            "layers": recipe.text_layers,
        },
        "init_logit_scale": recipe.init_logit_scale,
    }


def build_model(recipe: MiniCLIPRecipe, vocab_size: int) -> open_clip.model.CLIP:
    """Build an untrained MiniCLIP, initialised from torch's global generator."""
    return open_clip.model.CLIP(**model_config(recipe, vocab_size))


def images_to_tensor(images: np.ndarray) -> torch.Tensor:
    """Turn uint8 grey images (N, H, W) into normalised model input (N, 3, H, W) float32.

    This is the batch form of ``GreyPreprocess`` and gives the same values.
    """
    if images.dtype != np.uint8 or images.ndim != 3:
        raise ValueError(f"images must be uint8 of shape (N, H, W), got dtype {images.dtype} and shape {images.shape}")
    x = torch.from_numpy(images.astype(np.float32)).div_(255.0)  # (N, H, W), a writable copy
    x = (x - PIXEL_MEAN) / PIXEL_STD
    return x.unsqueeze(1).expand(-1, 3, -1, -1).contiguous()  # (N, 3, H, W)


@dataclass(frozen=True)
class GreyPreprocess:
    """MiniCLIP's evaluation transform: PIL image -> grey -> (3, image_size, image_size) tensor."""

    image_size: int = 28  # output side in pixels; other sizes are resized with bicubic interpolation

    def __call__(self, image: Image.Image) -> torch.Tensor:
        grey = image.convert("L")
        if grey.size != (self.image_size, self.image_size):
            grey = grey.resize((self.image_size, self.image_size), Image.Resampling.BICUBIC)
        return images_to_tensor(np.asarray(grey)[None])[0]  # (3, image_size, image_size)


# Pretraining


def _param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        is_matrix = param.ndim >= 2 and "embedding" not in name
        (decay if is_matrix else no_decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _lr_factor(step: int, total_steps: int, warmup_steps: int) -> float:
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def pretrain(
    recipe: MiniCLIPRecipe, seed: int, device: torch.device | str = "cpu"
) -> tuple[open_clip.model.CLIP, CompactTokenizer, list[dict]]:
    """Pretrain a MiniCLIP from scratch and return the model (in train mode), tokenizer and per-epoch log.

    Initialisation, shuffling, styles and captions all draw from generators seeded by
    ``seed``, so on CPU the same recipe and seed give identical weights with the same
    torch build and thread count. The caller's global torch random state is left
    unchanged.
    """
    # NOTE: the cache key ignores the device. Weights pretrained on CUDA differ slightly
    # from CPU ones and are reused for CPU calls; CUDA pretraining has not been tested.
    device = torch.device(device)
    train = load_fashion_mnist("train")
    images, labels = train.images[: recipe.num_images], train.labels[: recipe.num_images]
    styles = [style for style, _ in recipe.styles]
    style_probs = np.array([p for _, p in recipe.styles])
    styled = np.stack([apply_style(images, style, seed=seed) for style in styles])  # (S, N, H, W)

    tokenizer = build_tokenizer(recipe)
    table = _caption_table(tokenizer)
    caption_tokens = table.tokens.to(device)  # (num_captions, context_length)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build_model(recipe, tokenizer.vocab_size).to(device)

    optimizer = torch.optim.AdamW(_param_groups(model, recipe.weight_decay), lr=recipe.lr)
    steps_per_epoch = recipe.num_images // recipe.batch_size
    total_steps = steps_per_epoch * recipe.epochs
    warmup_steps = max(1, round(recipe.warmup_fraction * total_steps))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: _lr_factor(s, total_steps, warmup_steps))
    loss_fn = open_clip.loss.ClipLoss()
    rng = np.random.default_rng(seed)
    model.train()

    log = []
    progress = tqdm(total=total_steps, desc="pretraining MiniCLIP", unit="step")
    for epoch in range(recipe.epochs):
        start, losses = time.perf_counter(), []
        order = rng.permutation(recipe.num_images)
        style_idx = rng.choice(len(styles), size=recipe.num_images, p=style_probs)
        image_styles = [styles[i] for i in style_idx]
        caption_rows = _sample_captions(table, image_styles, labels, recipe, rng)

        for step in range(steps_per_epoch):
            batch = order[step * recipe.batch_size : (step + 1) * recipe.batch_size]
            x = images_to_tensor(styled[style_idx[batch], batch]).to(device)  # (B, 3, H, W)
            text = caption_tokens[torch.from_numpy(caption_rows[batch]).to(device)]  # (B, context_length)

            image_features, text_features, logit_scale = model(x, text)[:3]
            loss = loss_fn(image_features, text_features, logit_scale)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            with torch.no_grad():
                model.logit_scale.clamp_(0, math.log(100))  # CLIP's cap on the inverse temperature

            losses.append(loss.item())
            progress.update(1)
            progress.set_postfix(epoch=epoch, loss=f"{losses[-1]:.3f}")

        log.append(
            {
                "epoch": epoch,
                "mean_loss": float(np.mean(losses)),
                "logit_scale": model.logit_scale.detach().exp().item(),
                "seconds": round(time.perf_counter() - start, 2),
            }
        )
        logger.info("MiniCLIP epoch %d: mean contrastive loss %.4f", epoch, log[-1]["mean_loss"])
    progress.close()
    return model, tokenizer, log


# Cache and loading


def recipe_name(recipe: MiniCLIPRecipe) -> str:
    """Return the name under which ``recipe`` is registered in ``RECIPES``, or "custom"."""
    for name, registered in RECIPES.items():
        if registered == recipe:
            return name
    return "custom"


def resolve_recipe(recipe: str | MiniCLIPRecipe) -> MiniCLIPRecipe:
    """Look up a recipe name in ``RECIPES``, or return a ``MiniCLIPRecipe`` unchanged."""
    if isinstance(recipe, MiniCLIPRecipe):
        return recipe
    if recipe not in RECIPES:
        raise ValueError(f"MiniCLIP recipe {recipe!r} is unknown; choose one of {sorted(RECIPES)} or pass a MiniCLIPRecipe")
    return RECIPES[recipe]


def miniclip_key(recipe: MiniCLIPRecipe, seed: int) -> str:
    """Return the cache key: a hash of the recipe, seed, caption tables and code version."""
    captions = {
        "templates": CAPTION_TEMPLATES,
        "attribute_templates": ATTRIBUTE_TEMPLATES,
        "attributes": CLASS_ATTRIBUTES,
        "style_words": STYLE_CAPTION_WORDS,
        "extra_vocabulary": EXTRA_VOCABULARY,
    }
    return content_key({"recipe": recipe, "seed": seed, "captions": captions, "code_version": MINICLIP_CODE_VERSION})


def _save(folder: Path, model: torch.nn.Module, tokenizer: CompactTokenizer, meta: dict) -> dict:
    """Write weights, tokenizer and metadata; return the metadata with the weights' hash added."""
    # The metadata file is written last, so its presence marks a complete entry.
    state = {name: tensor.detach().cpu().contiguous() for name, tensor in model.state_dict().items()}
    weights = folder / "model.safetensors"
    atomic_write(weights, lambda tmp: save_file(state, str(tmp)))
    tokenizer.save(folder / "tokenizer.json")
    meta = {**meta, "weights_sha256": file_sha256(weights)}
    atomic_write_json(folder / "miniclip.json", meta)
    return meta


def _load(folder: Path, recipe: MiniCLIPRecipe) -> tuple[open_clip.model.CLIP, CompactTokenizer, dict]:
    meta = read_json(folder / "miniclip.json")
    weights = folder / "model.safetensors"
    if not weights.is_file() or file_sha256(weights) != meta.get("weights_sha256"):
        raise RuntimeError(f"{weights} is missing or does not match the hash recorded in {folder / 'miniclip.json'}")

    tokenizer = CompactTokenizer.load(folder / "tokenizer.json")
    model = build_model(recipe, tokenizer.vocab_size)
    try:
        model.load_state_dict(load_file(str(weights)))
    except (RuntimeError, OSError) as e:
        raise RuntimeError(f"failed to load MiniCLIP weights from {weights}: {e}") from e
    return model, tokenizer, meta


def load_miniclip(
    recipe: str | MiniCLIPRecipe = "default",
    seed: int = 0,
    cache_dir: str | os.PathLike | None = None,
    device: str | torch.device = "cpu",
) -> Backbone:
    """Return a frozen, pretrained MiniCLIP, pretraining it first unless the cache contains it.

    ``recipe`` is a key of ``RECIPES`` or a ``MiniCLIPRecipe``. The weights live in
    ``resolve_cache_dir(cache_dir)/miniclip/<key>``. A changed recipe, seed, caption
    table or ``MINICLIP_CODE_VERSION`` gives a new key and a new pretraining run.
    """
    name = recipe if isinstance(recipe, str) else recipe_name(recipe)
    recipe = resolve_recipe(recipe)
    device = resolve_device(device)
    key = miniclip_key(recipe, seed)
    folder = resolve_cache_dir(cache_dir) / "miniclip" / key

    meta = None
    if (folder / "miniclip.json").is_file():
        try:
            model, tokenizer, meta = _load(folder, recipe)
            logger.info("reusing cached MiniCLIP at %s", folder)
        except (RuntimeError, ValueError, FileNotFoundError) as e:
            logger.warning("cached MiniCLIP at %s is unusable (%s); pretraining it again", folder, e)

    if meta is None:
        logger.info("pretraining MiniCLIP (recipe %s, seed %d) into %s", name, seed, folder)
        start, cpu_start = time.perf_counter(), time.process_time()
        model, tokenizer, log = pretrain(recipe, seed, device)
        meta = {
            "format": MINICLIP_FORMAT,
            "key": key,
            "recipe_name": name,
            "recipe": dataclasses.asdict(recipe),
            "seed": seed,
            "code_version": MINICLIP_CODE_VERSION,
            "model_config": model_config(recipe, tokenizer.vocab_size),
            "param_count": sum(p.numel() for p in model.parameters()),
            "pretrain_seconds": round(time.perf_counter() - start, 2),
            # CPU time of all threads. It varies less with other load than wall time does,
            # although threads that spin-wait on a busy machine inflate it.
            "pretrain_cpu_seconds": round(time.process_time() - cpu_start, 2),
            "pretrain_log": log,
            "pretrain_device": str(device),
            "torch_num_threads": torch.get_num_threads(),
            "versions": {"torch": torch.__version__, "open_clip": open_clip.__version__},
        }
        meta = _save(folder, model, tokenizer, meta)

    model = model.to(device).eval().requires_grad_(False)
    return Backbone(
        model=model,
        tokenizer=tokenizer,
        preprocess=GreyPreprocess(recipe.image_size),
        name="MiniCLIP",
        pretrained=f"miniclip-{name}-seed{seed}",
        key=key,
        image_size=recipe.image_size,
        context_length=recipe.context_length,
        info={
            "recipe": dataclasses.asdict(recipe),
            "recipe_name": name,
            "param_count": meta["param_count"],
            "pretrain_seconds": meta["pretrain_seconds"],
            "pretrain_cpu_seconds": meta.get("pretrain_cpu_seconds"),
            "torch_num_threads": meta.get("torch_num_threads"),
            "pretrain_log": meta["pretrain_log"],
            "cache_folder": str(folder),
            "weights_sha256": meta["weights_sha256"],
        },
    )
