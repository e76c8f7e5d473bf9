"""Tests for capt_lib.backbones.loading: checkpoints, open_clip tags, offline mode, MiniCLIP dispatch.

No test downloads anything: every test that reaches a tag runs with offline=True or a
patched probe, an empty Hugging Face cache under tmp_path, and socket connections
recorded so that an attempt to reach the network fails the test.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
import sys
import time
import types
from pathlib import Path

import open_clip
import pytest
import torch
from open_clip.transformer import QuickGELU
from PIL import Image
from safetensors.torch import load_file, save_file

from capt_lib.backbones import loading
from capt_lib.backbones.loading import BackboneConfig, load_backbone, save_random_checkpoint

# Tiny architectures registered with open_clip for these tests; they build in milliseconds.
TINY_ARCH = "capt-test-tiny-vit"
TINY_WIDE_ARCH = "capt-test-tiny-vit-wide"
TEXT_CFG = {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}
TINY_CONFIGS = {
    TINY_ARCH: {
        "embed_dim": 32,
        "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 32, "layers": 1, "head_width": 16},
        "text_cfg": TEXT_CFG,
    },
    TINY_WIDE_ARCH: {
        "embed_dim": 32,
        "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 48, "layers": 1, "head_width": 16},
        "text_cfg": TEXT_CFG,
    },
}


@pytest.fixture
def isolated_caches(tmp_path, monkeypatch):
    """Point the Hugging Face and open_clip caches at empty folders under tmp_path."""
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    return tmp_path


@pytest.fixture
def connection_attempts(monkeypatch):
    """Record every outgoing socket connection and reject it."""
    attempts = []

    def reject_connection(self, address, *args):
        attempts.append(address)
        raise OSError(f"test blocks network access to {address}")

    monkeypatch.setattr(socket.socket, "connect", reject_connection)
    monkeypatch.setattr(socket.socket, "connect_ex", reject_connection)
    return attempts


@pytest.fixture(scope="module")
def b16_checkpoint(tmp_path_factory):
    return save_random_checkpoint("ViT-B-16", tmp_path_factory.mktemp("b16") / "random.safetensors", seed=0)


@pytest.fixture(scope="module", autouse=True)
def tiny_architectures(tmp_path_factory):
    folder = tmp_path_factory.mktemp("open_clip_configs")
    for name, config in TINY_CONFIGS.items():
        (folder / f"{name}.json").write_text(json.dumps(config))
    open_clip.add_model_config(folder)


@pytest.fixture(scope="module")
def small_checkpoint(tmp_path_factory, tiny_architectures):
    return save_random_checkpoint(TINY_ARCH, tmp_path_factory.mktemp("small") / "random.safetensors", seed=0)


@pytest.fixture(scope="module")
def small_backbone(small_checkpoint):
    return load_backbone(BackboneConfig(TINY_ARCH, checkpoint=str(small_checkpoint)), device="cpu")


def assert_weights_equal(model: torch.nn.Module, expected: dict[str, torch.Tensor]) -> None:
    loaded = model.state_dict()
    assert sorted(loaded) == sorted(expected)
    for name, tensor in expected.items():
        assert torch.equal(loaded[name].cpu(), tensor), name


def sha256_of(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


# --- local checkpoints -------------------------------------------------------------


def test_random_vit_b16_round_trip(b16_checkpoint, caplog):
    with caplog.at_level(logging.WARNING):
        backbone = load_backbone(BackboneConfig("ViT-B-16", checkpoint=str(b16_checkpoint)), device="cpu")

    assert_weights_equal(backbone.model, load_file(b16_checkpoint))
    assert backbone.random_weights is True
    random_warnings = [r for r in caplog.records if "weights are random" in r.getMessage()]
    assert len(random_warnings) == 1
    assert random_warnings[0].levelno == logging.WARNING
    # open_clip's own "initialized randomly" line is dropped: the weights are loaded right after it.
    assert not any("initialized randomly" in r.getMessage() for r in caplog.records)

    assert backbone.name == "ViT-B-16"
    assert backbone.pretrained == str(b16_checkpoint)
    assert backbone.info["checkpoint_sha256"] == sha256_of(b16_checkpoint)
    assert backbone.image_size == 224
    assert backbone.context_length == 77
    assert not backbone.model.training
    assert not any(p.requires_grad for p in backbone.model.parameters())

    image = backbone.preprocess(Image.new("RGB", (300, 200), color=(255, 0, 0)))
    assert image.shape == (3, 224, 224)
    # A pure red image after CLIP normalisation: channel 0 is (1 - 0.48145466) / 0.26862954.
    assert image[0, 100, 100].item() == pytest.approx((1 - 0.48145466) / 0.26862954, abs=1e-4)
    assert backbone.tokenizer(["a photo of a dog."]).shape == (1, 77)


def test_random_checkpoint_is_seeded(tmp_path):
    rng_before = torch.get_rng_state()
    first = save_random_checkpoint(TINY_ARCH, tmp_path / "a.safetensors", seed=3)
    second = save_random_checkpoint(TINY_ARCH, tmp_path / "b.safetensors", seed=3)
    other = save_random_checkpoint(TINY_ARCH, tmp_path / "c.safetensors", seed=4)

    first_weights, second_weights, other_weights = load_file(first), load_file(second), load_file(other)
    assert all(torch.equal(first_weights[name], second_weights[name]) for name in first_weights)
    assert not torch.equal(first_weights["visual.proj"], other_weights["visual.proj"])
    assert loading.weights_sha256(first_weights) == loading.weights_sha256(second_weights)
    assert loading.weights_sha256(first_weights) != loading.weights_sha256(other_weights)
    assert torch.equal(torch.get_rng_state(), rng_before)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_random_checkpoint_needs_safetensors_suffix(tmp_path):
    with pytest.raises(ValueError, match=r"\.safetensors"):
        save_random_checkpoint(TINY_ARCH, tmp_path / "random.pt")


def test_torch_checkpoint_with_wrapper(small_checkpoint, small_backbone, tmp_path, caplog):
    # open_clip's training script saves {"state_dict": ...} with DistributedDataParallel's "module." prefix.
    weights = load_file(small_checkpoint)
    path = tmp_path / "epoch_1.pt"
    torch.save({"epoch": 1, "state_dict": {f"module.{k}": v for k, v in weights.items()}}, path)

    with caplog.at_level(logging.WARNING):
        backbone = load_backbone(BackboneConfig(TINY_ARCH, checkpoint=str(path)), device="cpu")

    assert_weights_equal(backbone.model, weights)
    assert backbone.random_weights is False
    assert not any("weights are random" in r.getMessage() for r in caplog.records)
    # The key follows the weights, not the file format.
    assert backbone.key == small_backbone.key


def test_weights_sha256_by_hand():
    state_dict = {"b": torch.tensor([1.0, 2.0]), "a": torch.tensor(3, dtype=torch.int64)}
    expected = hashlib.sha256(
        b"a|torch.int64|()|" + (3).to_bytes(8, "little") + b"b|torch.float32|(2,)|" + bytes.fromhex("0000803f00000040")
    ).hexdigest()
    assert loading.weights_sha256(state_dict) == expected


def test_checkpoint_of_other_architecture(small_checkpoint):
    with pytest.raises(RuntimeError) as error:
        load_backbone(BackboneConfig(TINY_WIDE_ARCH, checkpoint=str(small_checkpoint)), device="cpu")

    message = str(error.value)
    assert str(small_checkpoint) in message
    # Widths 32 and 48 differ, so e.g. the class embedding has shape (32,) in the file and (48,) in the model.
    assert "visual.class_embedding: (32,) vs (48,)" in message
    assert "model_name" in message


def test_checkpoint_missing_key(small_checkpoint, tmp_path):
    weights = load_file(small_checkpoint)
    del weights["logit_scale"]
    path = tmp_path / "incomplete.safetensors"
    save_file(weights, str(path))

    with pytest.raises(RuntimeError) as error:
        load_backbone(BackboneConfig(TINY_ARCH, checkpoint=str(path)), device="cpu")

    assert str(path) in str(error.value)
    assert "1 missing keys" in str(error.value)
    assert "logit_scale" in str(error.value)


def test_checkpoint_extra_key(small_checkpoint, tmp_path):
    weights = load_file(small_checkpoint)
    weights["prompt_learner.ctx"] = torch.zeros(4, 8)
    path = tmp_path / "extra.safetensors"
    save_file(weights, str(path))

    with pytest.raises(RuntimeError, match=r"1 unexpected keys .*prompt_learner\.ctx"):
        load_backbone(BackboneConfig(TINY_ARCH, checkpoint=str(path)), device="cpu")


def test_missing_checkpoint_file(tmp_path):
    path = tmp_path / "nowhere.safetensors"
    with pytest.raises(FileNotFoundError, match=str(path)):
        load_backbone(BackboneConfig("ViT-B-16", checkpoint=str(path)), device="cpu")


def test_corrupt_safetensors_file(tmp_path):
    path = tmp_path / "corrupt.safetensors"
    path.write_bytes(b"not a safetensors file")
    with pytest.raises(RuntimeError, match=str(path)):
        load_backbone(BackboneConfig(TINY_ARCH, checkpoint=str(path)), device="cpu")


@pytest.mark.filterwarnings("ignore:'torch.load' received a zip file that looks like a TorchScript archive")
@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:FutureWarning")
def test_torchscript_checkpoint_rejected(tmp_path):
    path = tmp_path / "scripted.pt"
    torch.jit.script(torch.nn.Linear(2, 2)).save(str(path))

    with pytest.raises(RuntimeError) as error:
        load_backbone(BackboneConfig(TINY_ARCH, checkpoint=str(path)), device="cpu")

    assert str(path) in str(error.value)
    assert "TorchScript" in str(error.value)


def test_precision_changes_key(small_checkpoint, small_backbone):
    fp32 = small_backbone
    bf16 = load_backbone(BackboneConfig(TINY_ARCH, checkpoint=str(small_checkpoint), precision="bf16"), device="cpu")
    with pytest.warns(UserWarning, match="fp16"):
        fp16 = load_backbone(
            BackboneConfig(TINY_ARCH, checkpoint=str(small_checkpoint), precision="fp16"), device="cpu"
        )

    assert fp32.key != bf16.key
    assert bf16.info["precision"] == "bf16"
    # fp16 on CPU runs in fp32, so it shares the fp32 key and its caches.
    assert fp16.info["precision"] == "fp32"
    assert fp16.key == fp32.key
    # Weights stay fp32 whatever the precision, because autocast picks the compute dtype.
    assert {p.dtype for p in bf16.model.parameters()} == {torch.float32}


# --- configuration errors ------------------------------------------------------------


def test_unknown_architecture(connection_attempts):
    with pytest.raises(ValueError) as error:
        load_backbone(BackboneConfig("ViT-B-61", "openai", offline=True), device="cpu")

    assert "'ViT-B-61'" in str(error.value)
    assert "ViT-B-16" in str(error.value)
    assert connection_attempts == []


def test_unknown_tag(connection_attempts):
    with pytest.raises(ValueError) as error:
        load_backbone(BackboneConfig("ViT-B-16", "opneai"), device="cpu")

    message = str(error.value)
    assert "'opneai'" in message
    assert "Close matches: ['openai']" in message
    for tag in open_clip.list_pretrained_tags_by_model("ViT-B-16"):
        assert tag in message
    assert connection_attempts == []


def test_architecture_without_tags():
    with pytest.raises(ValueError, match="no pretrained tags for 'ViT-S-32'"):
        load_backbone(BackboneConfig("ViT-S-32", "openai", offline=True), device="cpu")


def test_no_weights_named():
    with pytest.raises(ValueError, match="save_random_checkpoint"):
        load_backbone(BackboneConfig("ViT-B-16"), device="cpu")


def test_tag_and_checkpoint_together(small_checkpoint):
    with pytest.raises(ValueError, match="Set only one"):
        load_backbone(BackboneConfig(TINY_ARCH, "openai", checkpoint=str(small_checkpoint)), device="cpu")


def test_invalid_precision():
    with pytest.raises(ValueError, match="'fp8'"):
        BackboneConfig("ViT-B-16", "openai", precision="fp8")


# --- open_clip tags and offline mode ---------------------------------------------------


def test_offline_without_cached_weights(isolated_caches, connection_attempts):
    start = time.monotonic()
    with pytest.raises(RuntimeError) as error:
        load_backbone(BackboneConfig("ViT-B-16", "openai", offline=True), device="cpu")
    elapsed = time.monotonic() - start

    message = str(error.value)
    assert "ViT-B-16" in message
    assert "'openai'" in message
    assert "checkpoint=PATH" in message
    assert "model_name='ViT-B-16-quickgelu'" in message
    assert str(isolated_caches / "hf_home" / "hub") in message
    assert elapsed < 30
    assert connection_attempts == []


def test_tag_spelling_is_normalised(isolated_caches, connection_attempts):
    # "OpenAI" passes validation as open_clip's "openai", so the failure is the offline one.
    with pytest.raises(RuntimeError, match="pretrained='openai'"):
        load_backbone(BackboneConfig("ViT-B-16", "OpenAI", offline=True), device="cpu")


def test_offline_reads_hub_cache(isolated_caches, connection_attempts, b16_checkpoint):
    # The Hugging Face Hub cache layout: refs/main names a snapshot folder holding the files.
    repo_dir = isolated_caches / "hf_home" / "hub" / "models--timm--vit_base_patch16_clip_224.openai"
    commit = "0123456789abcdef0123456789abcdef01234567"
    (repo_dir / "refs").mkdir(parents=True)
    (repo_dir / "refs" / "main").write_text(commit)
    snapshot = repo_dir / "snapshots" / commit
    snapshot.mkdir(parents=True)
    os.symlink(b16_checkpoint, snapshot / "open_clip_model.safetensors")

    backbone = load_backbone(BackboneConfig("ViT-B-16", "openai", offline=True), device="cpu")

    assert_weights_equal(backbone.model, load_file(b16_checkpoint))
    assert backbone.pretrained == "openai"
    assert isinstance(backbone.model.visual.transformer.resblocks[0].mlp.gelu, QuickGELU)
    assert isinstance(backbone.model.transformer.resblocks[0].mlp.gelu, QuickGELU)
    assert backbone.info["quick_gelu"] is True
    assert "HF_HUB_OFFLINE" not in os.environ
    assert connection_attempts == []


def test_online_failure_gives_advice(monkeypatch):
    def failing_download(*args, **kwargs):
        raise RuntimeError("Failed to download weights for tag 'openai'")

    monkeypatch.setattr(loading.open_clip, "create_model_and_transforms", failing_download)
    with pytest.raises(RuntimeError) as error:
        load_backbone(BackboneConfig("ViT-B-16", "openai", offline=False), device="cpu")

    assert "Failed to download weights" in str(error.value)
    assert "checkpoint=PATH" in str(error.value)
    assert isinstance(error.value.__cause__, RuntimeError)


def test_offline_flag_from_environment(monkeypatch):
    def fail_probe(*args):
        raise AssertionError("the network probe ran although HF_HUB_OFFLINE is set")

    monkeypatch.setattr(loading, "host_reachable", fail_probe)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert loading.is_offline(None) is True
    assert loading.is_offline(False) is False


def test_offline_decided_by_probe(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(loading.hf_constants, "HF_HUB_OFFLINE", False)

    monkeypatch.setattr(loading, "host_reachable", lambda host, port, timeout: False)
    assert loading.is_offline(None) is True
    monkeypatch.setattr(loading, "host_reachable", lambda host, port, timeout: True)
    assert loading.is_offline(None) is False


def test_probe_on_loopback():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        open_port = server.getsockname()[1]
        assert loading.host_reachable("127.0.0.1", open_port, timeout=2.0) is True

    # The port was just released and nothing listens on it any more.
    start = time.monotonic()
    assert loading.host_reachable("127.0.0.1", open_port, timeout=2.0) is False
    assert time.monotonic() - start < 5


# --- MiniCLIP ------------------------------------------------------------------------


def test_miniclip_dispatch(monkeypatch):
    calls = []

    def fake_load_miniclip(**kwargs):
        calls.append(kwargs)
        return types.SimpleNamespace(name="MiniCLIP", info={"recipe": kwargs["recipe"]})

    fake_module = types.ModuleType("capt_lib.backbones.miniclip")
    fake_module.load_miniclip = fake_load_miniclip
    monkeypatch.setitem(sys.modules, "capt_lib.backbones.miniclip", fake_module)

    cfg = BackboneConfig("MiniCLIP", miniclip_recipe="tiny", miniclip_seed=7, cache_dir="/tmp/capt-cache")
    backbone = load_backbone(cfg, device="cpu")

    assert calls == [{"recipe": "tiny", "seed": 7, "cache_dir": "/tmp/capt-cache", "device": "cpu"}]
    assert backbone.info == {"recipe": "tiny", "precision": "fp32"}


def test_miniclip_rejects_tag():
    with pytest.raises(ValueError, match="miniclip_recipe"):
        load_backbone(BackboneConfig("MiniCLIP", "openai"), device="cpu")
