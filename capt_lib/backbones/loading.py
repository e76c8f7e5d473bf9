"""Load a frozen CLIP backbone from an open_clip tag, a local checkpoint, or the MiniCLIP recipe.

Three sources are accepted, and each must be named explicitly, so a misspelled tag or a
forgotten setting never yields a randomly initialised model:

* ``model_name="MiniCLIP"``: the small offline model that ``capt_lib.backbones.miniclip``
  pretrains and caches;
* ``checkpoint=PATH``: an open_clip state dict in a ``.safetensors`` file, or in a
  ``.pt``/``.pth``/``.bin`` file read with ``torch.load(weights_only=True)``;
* ``pretrained=TAG``: an open_clip pretrained tag such as ``"openai"``, downloaded by
  open_clip, or taken from the local caches when the machine is offline.

Random weights come only from files written by ``save_random_checkpoint``. Those files
carry a metadata flag, and loading one sets ``Backbone.random_weights``.

Weights stay in fp32 on every device. ``precision`` selects the autocast dtype that
later stages use (``capt_lib.utils.device.autocast``), and fp16 on CPU is upcast to
fp32 with a warning.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import hashlib
import logging
import os
import socket
import threading
from dataclasses import dataclass
from pathlib import Path

import open_clip
import torch
from huggingface_hub import try_to_load_from_cache
from huggingface_hub import constants as hf_constants
from safetensors import safe_open
from safetensors.torch import save_file

from capt_lib.backbones.base import Backbone
from capt_lib.utils.cache import content_key, file_sha256
from capt_lib.utils.device import PRECISIONS, resolve_device, resolve_precision
from capt_lib.utils.io import atomic_write

logger = logging.getLogger(__name__)

MINICLIP_NAME = "MiniCLIP"
RANDOM_INIT_FLAG = "capt_random_init"  # safetensors metadata key set by save_random_checkpoint
TORCH_CHECKPOINT_SUFFIXES = (".pt", ".pth", ".bin")

# The network probe: a TCP connection to the Hugging Face Hub, which serves open_clip's weights.
PROBE_HOST = "huggingface.co"
PROBE_PORT = 443
PROBE_TIMEOUT_S = 2.0

# Folder where open_clip 3.3.0 stores weights that it downloads from a plain URL instead of the Hub.
OPEN_CLIP_URL_CACHE = Path("~/.cache/clip")


@dataclass(frozen=True)
class BackboneConfig:
    """Backbone settings. Exactly one of MiniCLIP, ``pretrained`` and ``checkpoint`` names the weights."""

    model_name: str  # open_clip architecture such as "ViT-B-16", or "MiniCLIP"
    pretrained: str | None = None  # open_clip pretrained tag such as "openai"
    checkpoint: str | None = None  # local state-dict file (.safetensors, .pt, .pth or .bin)
    offline: bool | None = None  # True never downloads, and None probes the network once
    precision: str = "fp32"  # autocast dtype for the frozen model: "fp32", "bf16" or "fp16"
    miniclip_recipe: str = "default"  # MiniCLIP pretraining recipe name
    miniclip_seed: int = 0  # MiniCLIP pretraining seed
    cache_dir: str | None = None  # capt cache root for MiniCLIP, or None for resolve_cache_dir()

    def __post_init__(self):
        if not self.model_name:
            raise ValueError("BackboneConfig.model_name is empty. Use an open_clip architecture or 'MiniCLIP'.")
        if self.precision not in PRECISIONS:
            raise ValueError(
                f"BackboneConfig.precision={self.precision!r} is invalid. Choose one of {sorted(PRECISIONS)}."
            )


def load_backbone(cfg: BackboneConfig, device: str | torch.device | None = "auto") -> Backbone:
    """Build the frozen backbone that ``cfg`` names, on ``device`` ("auto" picks CUDA when present)."""
    device = resolve_device(device)
    precision = resolve_precision(cfg.precision, device)

    if cfg.model_name == MINICLIP_NAME:
        return _load_miniclip(cfg, device, precision)

    _check_architecture(cfg.model_name)
    if cfg.pretrained is not None and cfg.checkpoint is not None:
        raise ValueError(
            f"BackboneConfig sets both pretrained={cfg.pretrained!r} and checkpoint={cfg.checkpoint!r}. "
            "Set only one of them."
        )
    if cfg.checkpoint is not None:
        return _load_from_checkpoint(cfg, device, precision)
    if cfg.pretrained is not None:
        return _load_from_tag(cfg, device, precision)

    raise ValueError(
        f"BackboneConfig(model_name={cfg.model_name!r}) names no weights: set pretrained to one of "
        f"{open_clip.list_pretrained_tags_by_model(cfg.model_name)} or checkpoint to a local file. "
        "For random weights on purpose, write a file with save_random_checkpoint() and pass it as checkpoint."
    )


def save_random_checkpoint(model_name: str, path: str | os.PathLike, seed: int = 0) -> Path:
    """Write a seeded random initialisation of ``model_name`` as a ``.safetensors`` file.

    The file's metadata marks the weights as random, so ``load_backbone`` flags every
    backbone built from it. Tests and benchmarks use it to run the real loading path
    with full-size architectures on machines that cannot download weights.
    """
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"save_random_checkpoint writes safetensors, so the path must end in .safetensors, got {path}")
    _check_architecture(model_name)

    # fork_rng keeps the caller's global torch random state untouched.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        with _without_random_init_warning():
            model = open_clip.create_model(model_name, pretrained=None, pretrained_text=False)

    state_dict = {name: tensor.contiguous() for name, tensor in model.state_dict().items()}
    metadata = {RANDOM_INIT_FLAG: "true", "model_name": model_name, "seed": str(seed)}
    atomic_write(path, lambda tmp: save_file(state_dict, str(tmp), metadata=metadata))
    logger.info("wrote random %s weights (seed %d) to %s", model_name, seed, path)
    return path


def is_offline(offline: bool | None) -> bool:
    """Decide whether downloads are impossible: the explicit setting, else HF_HUB_OFFLINE, else a probe."""
    if offline is not None:
        return offline
    if _env_flag("HF_HUB_OFFLINE") or hf_constants.is_offline_mode():
        return True
    reachable = host_reachable(PROBE_HOST, PROBE_PORT, PROBE_TIMEOUT_S)
    if not reachable:
        logger.info("%s:%d is unreachable, so open_clip weights load in offline mode", PROBE_HOST, PROBE_PORT)
    return not reachable


def host_reachable(host: str, port: int, timeout: float) -> bool:
    """Return True when a TCP connection to ``host:port`` opens within ``timeout`` seconds.

    The connection runs in a daemon thread because a DNS lookup ignores the socket
    timeout and can block far longer than ``timeout``.
    """
    outcome: list[bool] = []

    def connect():
        try:
            with socket.create_connection((host, port), timeout=timeout):
                outcome.append(True)
        except OSError:
            outcome.append(False)

    thread = threading.Thread(target=connect, name="capt-network-probe", daemon=True)
    thread.start()
    thread.join(timeout + 0.5)
    return bool(outcome) and outcome[0]


def _load_miniclip(cfg: BackboneConfig, device: torch.device, precision: str) -> Backbone:
    if cfg.pretrained is not None or cfg.checkpoint is not None:
        raise ValueError(
            f"MiniCLIP weights come from its pretraining recipe, so pretrained={cfg.pretrained!r} and "
            f"checkpoint={cfg.checkpoint!r} must both be None. Choose the recipe with miniclip_recipe."
        )

    # Imported here because MiniCLIP pulls in its pretraining code, which no other source needs.
    from capt_lib.backbones.miniclip import load_miniclip

    backbone = load_miniclip(
        recipe=cfg.miniclip_recipe, seed=cfg.miniclip_seed, cache_dir=cfg.cache_dir, device=str(device)
    )
    backbone.info.setdefault("precision", precision)
    return backbone


def _load_from_checkpoint(cfg: BackboneConfig, device: torch.device, precision: str) -> Backbone:
    path = Path(cfg.checkpoint).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint file not found: {path} (BackboneConfig.checkpoint)")

    state_dict, metadata = read_checkpoint(path)
    random_weights = metadata.get(RANDOM_INIT_FLAG) == "true"
    saved_name = metadata.get("model_name")
    if saved_name is not None and saved_name != cfg.model_name:
        logger.warning("%s was saved from %s but is loaded as %s", path, saved_name, cfg.model_name)

    # pretrained_text=False stops open_clip from fetching Hugging Face text weights that the checkpoint replaces.
    with _without_random_init_warning():
        model, _, preprocess = open_clip.create_model_and_transforms(
            cfg.model_name, pretrained=None, pretrained_text=False
        )
    load_state_dict_strict(model, state_dict, path)
    logger.info("loaded %s weights from %s", cfg.model_name, path)
    if random_weights:
        logger.warning("%s: weights are random; numbers from this model are not CLIP results", path)

    # The key hashes the tensors, not the file: safetensors writes metadata in no fixed order, so
    # two saves of the same weights can differ byte for byte.
    weights_sha = weights_sha256(state_dict)
    key = content_key({"model_name": cfg.model_name, "weights_sha256": weights_sha, "precision": precision})
    info = {
        "source": "checkpoint",
        "checkpoint": str(path),
        "checkpoint_sha256": file_sha256(path),
        "weights_sha256": weights_sha,
        "metadata": metadata,
    }
    return _wrap(model, preprocess, cfg, str(path), key, random_weights, info, device, precision)


def _load_from_tag(cfg: BackboneConfig, device: torch.device, precision: str) -> Backbone:
    tag = _check_tag(cfg.model_name, cfg.pretrained)
    tag_cfg = open_clip.get_pretrained_cfg(cfg.model_name, tag)

    # OpenAI's weights were trained with QuickGELU, but open_clip 3.3.0 builds plain "ViT-B-16" with
    # nn.GELU and only warns about the mismatch, which shifts every feature. Follow the tag instead.
    quick_gelu = bool(tag_cfg.get("quick_gelu", False))
    if quick_gelu and not open_clip.get_model_config(cfg.model_name).get("quick_gelu", False):
        logger.info("pretrained=%r was trained with QuickGELU, so %s is built with QuickGELU", tag, cfg.model_name)

    if is_offline(cfg.offline):
        model, preprocess = _create_offline(cfg.model_name, tag, tag_cfg, quick_gelu)
    else:
        model, preprocess = _create_online(cfg.model_name, tag, quick_gelu)
    logger.info("loaded %s with pretrained=%r", cfg.model_name, tag)

    key = content_key({"model_name": cfg.model_name, "pretrained": tag, "precision": precision})
    info = {"source": "open_clip", "quick_gelu": quick_gelu}
    return _wrap(model, preprocess, cfg, tag, key, False, info, device, precision)


def _create_online(model_name: str, tag: str, quick_gelu: bool):
    try:
        model, _, preprocess = open_clip.create_model_and_transforms(
            model_name, pretrained=tag, force_quick_gelu=quick_gelu
        )
    except (RuntimeError, OSError) as e:
        advice = _placement_advice(model_name, tag)
        raise RuntimeError(f"failed to download or load {model_name} pretrained={tag!r}: {e}. {advice}") from e
    return model, preprocess


def _create_offline(model_name: str, tag: str, tag_cfg: dict, quick_gelu: bool):
    """Build the model from weights already in a local cache, without any network access."""
    weights = find_cached_weights(tag_cfg)
    if weights is None:
        raise RuntimeError(
            f"offline mode: the weights of {model_name} pretrained={tag!r} are not in the local caches "
            f"({_hub_cache_dir()}, {OPEN_CLIP_URL_CACHE.expanduser()}), and they cannot be downloaded. "
            f"{_placement_advice(model_name, tag)}"
        )
    logger.info("offline mode: using cached weights %s", weights)

    # The tag's preprocessing (mean, std, interpolation, resize mode) is lost when open_clip is
    # given a file path, so it is passed explicitly.
    with _hf_hub_offline():
        try:
            model, _, preprocess = open_clip.create_model_and_transforms(
                model_name,
                pretrained=str(weights),
                force_quick_gelu=quick_gelu,
                pretrained_text=False,
                image_mean=tag_cfg.get("mean"),
                image_std=tag_cfg.get("std"),
                image_interpolation=tag_cfg.get("interpolation"),
                image_resize_mode=tag_cfg.get("resize_mode"),
            )
        except (RuntimeError, OSError) as e:
            raise RuntimeError(f"failed to load cached weights {weights} into {model_name}: {e}") from e
    return model, preprocess


def find_cached_weights(tag_cfg: dict) -> Path | None:
    """Return the local file open_clip would download for a pretrained tag, or None when not cached.

    It looks where open_clip 3.3.0 stores downloads: the Hugging Face Hub cache for
    ``hf_hub`` entries (safetensors first) and ``~/.cache/clip`` for plain URLs.
    """
    if tag_cfg.get("file"):
        path = Path(tag_cfg["file"])
        return path if path.is_file() else None

    hub_entry = tag_cfg.get("hf_hub", "")
    if hub_entry:
        repo_id, filename = os.path.split(hub_entry)
        for name in _hub_filenames(filename):
            cached = try_to_load_from_cache(repo_id, name, cache_dir=_hub_cache_dir())
            if isinstance(cached, str):
                return Path(cached)

    # NOTE: OpenAI's URL downloads are TorchScript archives, which torch 2.14 refuses to read with
    # weights_only=True, so a file found here for an "openai" tag fails to load with a RuntimeError.
    url = tag_cfg.get("url", "")
    if url:
        path = OPEN_CLIP_URL_CACHE.expanduser() / os.path.basename(url)
        if path.is_file():
            return path
    return None


def _hub_filenames(filename: str) -> list[str]:
    # An "org/repo/" entry without a file name means open_clip's default weight file names.
    if not filename:
        return [open_clip.constants.HF_SAFE_WEIGHTS_NAME, open_clip.constants.HF_WEIGHTS_NAME]
    stem, suffix = os.path.splitext(filename)
    if suffix in (".bin", ".pth"):
        return [stem + ".safetensors", filename]
    return [filename]


def _hub_cache_dir() -> Path:
    # Read at call time: huggingface_hub reads HF_HOME and HF_HUB_CACHE only once, when it is imported.
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    return Path(hf_constants.HF_HUB_CACHE)


@contextlib.contextmanager
def _hf_hub_offline():
    """Set HF_HUB_OFFLINE=1 inside the block and restore the previous value after it.

    huggingface_hub itself reads the variable only at import, so this mainly keeps libraries
    that open_clip imports lazily (such as transformers for Hugging Face tokenizers) offline.
    """
    previous = os.environ.get("HF_HUB_OFFLINE")
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = previous


class _OpenClipRandomInitFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("No pretrained weights loaded for model")


@contextlib.contextmanager
def _without_random_init_warning():
    """Drop open_clip's "Model initialized randomly" warning while an empty architecture is built.

    The warning would be false here: a checkpoint is loaded right after, or the caller asked
    for random weights and gets this module's own log line. open_clip 3.3.0 logs it through
    the root logger, so the filter sits there.
    """
    root = logging.getLogger()
    random_init_filter = _OpenClipRandomInitFilter()
    root.addFilter(random_init_filter)
    try:
        yield
    finally:
        root.removeFilter(random_init_filter)


def _placement_advice(model_name: str, tag: str) -> str:
    advice = (
        f"On a machine with internet, run open_clip.create_model({model_name!r}, pretrained={tag!r}), then either "
        "copy its Hugging Face cache (~/.cache/huggingface/hub) to the same place here, or pass the downloaded "
        "weight file from that cache (open_clip_model.safetensors or open_clip_pytorch_model.bin) as "
        "BackboneConfig(checkpoint=PATH)."
    )
    quick_gelu_name = f"{model_name}-quickgelu"
    if open_clip.get_pretrained_cfg(model_name, tag).get("quick_gelu") and quick_gelu_name in open_clip.list_models():
        advice += f" These weights were trained with QuickGELU, so load that file with model_name={quick_gelu_name!r}."
    return advice


def read_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read a state dict and its string metadata, which only safetensors files carry.

    A torch file may contain the state dict itself or wrap it under ``"state_dict"``, as
    open_clip's training script does. A ``"module."`` prefix left by DistributedDataParallel
    is removed.
    """
    if path.suffix == ".safetensors":
        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                metadata = dict(f.metadata() or {})
                state_dict = {name: f.get_tensor(name) for name in f.keys()}
        except Exception as e:  # safetensors raises its own SafetensorError for corrupt files
            raise RuntimeError(f"failed to read safetensors checkpoint {path}: {e}") from e
        return state_dict, metadata

    if path.suffix not in TORCH_CHECKPOINT_SUFFIXES:
        logger.warning("%s has an unknown suffix, so it is read with torch.load", path)
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch.load raises many types: pickle, zip and weights_only errors
        raise RuntimeError(
            f"failed to read torch checkpoint {path} with torch.load(weights_only=True): {e}. "
            "Files that need full unpickling and TorchScript archives (such as OpenAI's original ViT-B-16.pt) "
            "are rejected. Convert them to a plain state dict or safetensors."
        ) from e

    if isinstance(loaded, dict) and isinstance(loaded.get("state_dict"), dict):
        loaded = loaded["state_dict"]
    if not isinstance(loaded, dict) or not all(isinstance(v, torch.Tensor) for v in loaded.values()):
        raise RuntimeError(f"{path} does not contain a state dict (a mapping from parameter names to tensors)")
    if loaded and all(name.startswith("module.") for name in loaded):
        loaded = {name[len("module.") :]: tensor for name, tensor in loaded.items()}
    return loaded, {}


def weights_sha256(state_dict: dict[str, torch.Tensor]) -> str:
    """Hash the names, dtypes, shapes and bytes of a state dict, independent of the file format."""
    digest = hashlib.sha256()
    for name in sorted(state_dict):
        tensor = state_dict[name].detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def load_state_dict_strict(model: torch.nn.Module, state_dict: dict[str, torch.Tensor], path: Path) -> None:
    """Copy ``state_dict`` into ``model``, raising RuntimeError on any missing, unexpected or mis-shaped key."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    mis_shaped = sorted(
        name
        for name in set(expected) & set(state_dict)
        if tuple(expected[name].shape) != tuple(state_dict[name].shape)
    )

    problems = []
    if missing:
        problems.append(f"{len(missing)} missing keys (e.g. {missing[:3]})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected keys (e.g. {unexpected[:3]})")
    if mis_shaped:
        examples = [f"{n}: {tuple(state_dict[n].shape)} vs {tuple(expected[n].shape)}" for n in mis_shaped[:3]]
        problems.append(f"{len(mis_shaped)} keys with another shape (checkpoint vs model, e.g. {examples})")
    if problems:
        raise RuntimeError(
            f"checkpoint {path} does not fit the {type(model).__name__} architecture: {'; '.join(problems)}. "
            "Check that BackboneConfig.model_name is the architecture the checkpoint was saved from."
        )

    model.load_state_dict(state_dict, strict=True)


def _wrap(model, preprocess, cfg, pretrained, key, random_weights, info, device, precision) -> Backbone:
    """Freeze ``model``, move it to ``device`` and bundle it with its tokenizer and transform."""
    model = model.to(device).eval().requires_grad_(False)
    image_size = model.visual.image_size
    if isinstance(image_size, (tuple, list)):
        image_size = image_size[0]

    info = {**info, "config": dataclasses.asdict(cfg), "precision": precision}
    return Backbone(
        model=model,
        tokenizer=open_clip.get_tokenizer(cfg.model_name),
        preprocess=preprocess,
        name=cfg.model_name,
        pretrained=pretrained,
        key=key,
        image_size=int(image_size),
        context_length=int(model.context_length),
        random_weights=random_weights,
        info=info,
    )


def _check_architecture(model_name: str) -> None:
    known = open_clip.list_models()
    if model_name in known:
        return
    close = difflib.get_close_matches(model_name, known + [MINICLIP_NAME], n=5, cutoff=0.6)
    raise ValueError(
        f"model_name={model_name!r} is not an open_clip architecture or 'MiniCLIP'. Close matches: {close}. "
        "open_clip.list_models() lists all of them."
    )


def _check_tag(model_name: str, tag: str) -> str:
    """Return the tag in open_clip's spelling (lower case, "_" for "-"), or raise ValueError."""
    valid = open_clip.list_pretrained_tags_by_model(model_name)
    normalised = tag.lower().replace("-", "_")
    if normalised in valid:
        return normalised

    if not valid:
        raise ValueError(
            f"open_clip has no pretrained tags for {model_name!r}, so pretrained={tag!r} cannot be loaded. "
            "Pass a local checkpoint instead."
        )
    close = difflib.get_close_matches(normalised, valid, n=3, cutoff=0.5)
    raise ValueError(
        f"pretrained={tag!r} is not an open_clip tag for {model_name!r}. Close matches: {close}. Valid tags: {valid}"
    )


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in {"1", "true", "yes", "on"}
