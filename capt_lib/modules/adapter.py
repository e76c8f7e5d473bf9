"""Diff-Manner Adapter: a global attention branch and a local depthwise-convolution branch on ViT tokens.

For tokens X of shape (B, 1 + H*W, width), the adapter computes

    X_hat = MHSA(LayerNorm(X))                                   global branch, all tokens
    X[:, 1:] <- X[:, 1:] + alpha * DWConv2D(X_hat[:, 1:])        local branch, patch grid
    X[:, 0]  <- X[:, 0]  + alpha * Linear(X_hat[:, 0])           class token (class_token="linear")

with alpha = s * c**gamma per image (c = confusion intensity in [0, 1]) or alpha = s
("fixed" mode). The depthwise convolution and the class-token linear start at zero, so
the adapter is exactly the identity at step 0.

Two placements exist. "after_last_block" applies the adapter to the tokens after the
last ViT block, which the CAPT model caches once. "in_blocks" runs it on the output of
chosen blocks inside the frozen ViT through forward hooks (``attach_adapters``).
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass

import torch
from torch import nn

logger = logging.getLogger(__name__)

ALPHA_MODES = ("dynamic", "fixed")
PLACEMENTS = ("after_last_block", "in_blocks")
CLASS_TOKEN_MODES = ("linear", "unchanged")


@dataclass(frozen=True)
class DiffMannerAdapterConfig:
    """Settings of the Diff-Manner Adapter."""

    heads: int = 8  # attention heads of the global branch, a divisor of the token width
    kernel_size: int = 3  # side of the depthwise convolution kernel, odd so that the patch grid keeps its size
    s: float = 1.0  # scale s in alpha = s * c**gamma
    gamma: float = 1.0  # exponent gamma in alpha = s * c**gamma
    alpha_mode: str = "dynamic"  # "dynamic" gives alpha = s * c**gamma per image, "fixed" gives alpha = s
    placement: str = "after_last_block"  # "after_last_block" acts on the cached last-block tokens, "in_blocks" on hooked ViT blocks
    blocks: tuple[int, ...] = ()  # blocks whose output is adapted when placement="in_blocks", negative indices counting from the end
    class_token: str = "linear"  # "linear" adds alpha * zero-initialised Linear(X_hat[:, 0]) to the class token, "unchanged" does not
    bottleneck: int | None = None  # channels of both branches (down- and up-projected around them); None keeps the token width

    def __post_init__(self):
        _check_choice("alpha_mode", self.alpha_mode, ALPHA_MODES)
        _check_choice("placement", self.placement, PLACEMENTS)
        _check_choice("class_token", self.class_token, CLASS_TOKEN_MODES)
        if self.heads < 1:
            raise ValueError(f"DiffMannerAdapterConfig.heads={self.heads} must be at least 1")
        if self.kernel_size < 1 or self.kernel_size % 2 == 0:
            raise ValueError(f"DiffMannerAdapterConfig.kernel_size={self.kernel_size} must be a positive odd number")
        if self.bottleneck is not None and self.bottleneck < 1:
            raise ValueError(f"DiffMannerAdapterConfig.bottleneck={self.bottleneck} must be a positive channel count or None")
        if self.gamma < 0:
            raise ValueError(f"DiffMannerAdapterConfig.gamma={self.gamma} must be non-negative")
        if self.placement == "in_blocks" and not self.blocks:
            raise ValueError("DiffMannerAdapterConfig.blocks is empty; placement='in_blocks' needs at least one block index")


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"DiffMannerAdapterConfig.{name}={value!r} is not supported; choose one of {choices}")


class DiffMannerAdapter(nn.Module):
    """The adapter for one token sequence of ``1 + grid_h * grid_w`` tokens of size ``width``.

    The class token is not on the patch grid, so the depthwise convolution does not process it.
    With ``class_token="linear"`` it receives its own zero-initialised linear map of the
    global branch's class token. That path matters most after the last block: the CAPT
    model pools only the class token there, so the patch-token updates do not reach the
    prediction.

    With ``cfg.bottleneck`` set, both branches work in that many channels: a linear map
    projects the normalised tokens down before the attention, and another projects the
    local branch's output back up to the token width. A bottleneck makes the adapter's
    cost small against a ViT block, which is what lets cached tokens pay off.

    The parameters stay in the dtype they were created in (float32 by default). Tokens of
    another dtype are cast for the computation, and the update is cast back to theirs.
    """

    def __init__(self, width: int, grid_size: int | tuple[int, int], cfg: DiffMannerAdapterConfig):
        super().__init__()
        channels = cfg.bottleneck or width
        if channels % cfg.heads != 0:
            raise ValueError(
                f"DiffMannerAdapter: {channels} branch channels (bottleneck={cfg.bottleneck}, width={width}) "
                f"are not divisible by DiffMannerAdapterConfig.heads={cfg.heads}"
            )
        self.cfg = cfg
        self.width = width
        self.channels = channels
        self.grid_size = (grid_size, grid_size) if isinstance(grid_size, int) else tuple(grid_size)

        self.norm = nn.LayerNorm(width)
        self.down = nn.Linear(width, channels) if cfg.bottleneck else nn.Identity()
        self.attn = nn.MultiheadAttention(channels, cfg.heads, batch_first=True)
        self.local = nn.Conv2d(channels, channels, cfg.kernel_size, padding=cfg.kernel_size // 2, groups=channels)
        self.up = nn.Linear(channels, width, bias=False) if cfg.bottleneck else nn.Identity()
        self.class_proj = nn.Linear(channels, width) if cfg.class_token == "linear" else None
        self.reset_residual()

    def reset_residual(self) -> None:
        """Zero the layers that write into the residual stream, making the adapter the identity."""
        nn.init.zeros_(self.local.weight)
        nn.init.zeros_(self.local.bias)
        if self.class_proj is not None:
            nn.init.zeros_(self.class_proj.weight)
            nn.init.zeros_(self.class_proj.bias)

    def alpha(self, intensity: torch.Tensor | None, batch_size: int) -> torch.Tensor:
        """Per-image residual scale: (B,) ``s * c**gamma`` in "dynamic" mode, ``s`` in "fixed" mode.

        The intensity c is detached: it gates the update and is no learning signal. In
        "fixed" mode it is ignored and may be None.
        """
        device = self.local.weight.device
        if self.cfg.alpha_mode == "fixed":
            return torch.full((batch_size,), float(self.cfg.s), device=device)

        if intensity is None:
            raise ValueError("DiffMannerAdapter: alpha_mode='dynamic' needs the confusion intensity c; got None")
        if intensity.shape != (batch_size,):
            raise ValueError(
                f"DiffMannerAdapter: intensity has shape {tuple(intensity.shape)}; expected ({batch_size},), "
                "one confusion intensity per image"
            )
        # NOTE: this range check synchronises with the GPU once per call.
        if intensity.numel() and (intensity.min() < 0 or intensity.max() > 1):
            raise ValueError(
                f"DiffMannerAdapter: intensity must lie in [0, 1]; got values in "
                f"[{float(intensity.min())}, {float(intensity.max())}]"
            )
        c = intensity.detach().to(device=device, dtype=torch.float32)
        return self.cfg.s * c.pow(self.cfg.gamma)

    def forward(self, tokens: torch.Tensor, intensity: torch.Tensor | None = None) -> torch.Tensor:
        """Adapt ``tokens`` (B, 1 + H*W, width) for images of confusion intensity ``intensity`` (B,)."""
        self._check_tokens(tokens)
        batch_size = tokens.shape[0]
        grid_h, grid_w = self.grid_size
        alpha = self.alpha(intensity, batch_size)  # (B,)

        x = tokens.to(self.local.weight.dtype)
        h = self.down(self.norm(x))  # (B, 1 + H*W, channels)
        x_hat, _ = self.attn(h, h, h, need_weights=False)  # (B, 1 + H*W, channels)

        patches = x_hat[:, 1:].transpose(1, 2).reshape(batch_size, self.channels, grid_h, grid_w)  # (B, channels, H, W)
        local = self.up(self.local(patches).flatten(2).transpose(1, 2))  # (B, H*W, width)

        if self.class_proj is not None:
            class_update = self.class_proj(x_hat[:, :1])  # (B, 1, width)
        else:
            class_update = local.new_zeros(batch_size, 1, self.width)  # (B, 1, width)
        update = torch.cat([class_update, local], dim=1)  # (B, 1 + H*W, width)

        update = update * alpha.to(update.dtype)[:, None, None]  # alpha broadcast over tokens and channels
        return tokens + update.to(tokens.dtype)

    def _check_tokens(self, tokens: torch.Tensor) -> None:
        num_tokens = 1 + self.grid_size[0] * self.grid_size[1]
        if tokens.ndim != 3 or tokens.shape[1:] != (num_tokens, self.width):
            raise ValueError(
                f"DiffMannerAdapter: tokens have shape {tuple(tokens.shape)}; expected (B, {num_tokens}, {self.width}), "
                f"i.e. a class token plus a {self.grid_size[0]}x{self.grid_size[1]} patch grid"
            )


class AdapterHooks(nn.Module):
    """Diff-Manner Adapters that run on the output of chosen blocks of a frozen open_clip ViT.

    Usage::

        hooks = attach_adapters(model.visual, cfg.blocks, cfg)
        hooks.intensity = c            # (B,) for the next forward; not needed in "fixed" mode
        features = model.encode_image(images)
        hooks.remove()                 # the ViT is unchanged again

    The intensity stays set until it is replaced, and every hooked block reads the same
    one, so set it before each forward. A forward on a batch of another size raises
    ValueError rather than reusing a stale intensity. The adapters are submodules, so
    ``hooks.parameters()`` are the trainable weights and ``hooks.to(device)`` moves them.
    The ViT itself is not a submodule, so its frozen weights stay out of that list.
    """

    def __init__(self, visual: nn.Module, blocks: tuple[int, ...], cfg: DiffMannerAdapterConfig):
        super().__init__()
        resblocks = visual.transformer.resblocks
        width = visual.transformer.width
        self.cfg = cfg
        self.batch_first = getattr(visual.transformer, "batch_first", True)
        self.blocks = _normalise_blocks(blocks, len(resblocks))
        self.intensity: torch.Tensor | None = None

        device = next(visual.parameters()).device
        self.adapters = nn.ModuleDict(
            {str(index): DiffMannerAdapter(width, visual.grid_size, cfg) for index in self.blocks}
        ).to(device)
        self._handles = [
            resblocks[index].register_forward_hook(functools.partial(self._adapt_block_output, str(index)))
            for index in self.blocks
        ]
        logger.info("Diff-Manner Adapters attached after ViT blocks %s", list(self.blocks))

    def _adapt_block_output(self, key: str, module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        tokens = output if self.batch_first else output.transpose(0, 1)  # (B, 1 + H*W, width)
        adapted = self.adapters[key](tokens, self.intensity)
        return adapted if self.batch_first else adapted.transpose(0, 1)

    def remove(self) -> None:
        """Detach every hook from the ViT. A second call does nothing."""
        for handle in self._handles:
            handle.remove()
        self._handles = []


def _normalise_blocks(blocks: tuple[int, ...], num_blocks: int) -> tuple[int, ...]:
    """Turn block indices into sorted non-negative ones, rejecting out-of-range and repeated ones."""
    if not blocks:
        raise ValueError("attach_adapters: blocks is empty; name at least one ViT block index")
    normalised = []
    for index in blocks:
        if not -num_blocks <= index < num_blocks:
            raise ValueError(
                f"attach_adapters: block index {index} is out of range for a ViT with {num_blocks} blocks; "
                f"valid indices are {-num_blocks}..{num_blocks - 1}"
            )
        normalised.append(index % num_blocks)
    if len(set(normalised)) != len(normalised):
        raise ValueError(f"attach_adapters: blocks={tuple(blocks)} names a block twice")
    return tuple(sorted(normalised))


def attach_adapters(
    visual: nn.Module, blocks: tuple[int, ...] | None, cfg: DiffMannerAdapterConfig
) -> AdapterHooks:
    """Attach one Diff-Manner Adapter after each of ``blocks`` of an open_clip VisionTransformer.

    ``blocks=None`` takes ``cfg.blocks``. The adapter of block i transforms that block's
    output before block i + 1 (or the pooling, for the last block) reads it. The adapters
    are created on the ViT's device and are the identity until trained.
    """
    if cfg.placement != "in_blocks":
        raise ValueError(
            f"attach_adapters: DiffMannerAdapterConfig.placement={cfg.placement!r}; hooks inside the ViT "
            "need placement='in_blocks' (the 'after_last_block' adapter is applied to cached tokens instead)"
        )
    if not hasattr(visual, "transformer") or not hasattr(visual.transformer, "resblocks"):
        raise ValueError(
            f"attach_adapters: {type(visual).__name__} has no transformer.resblocks; "
            "expected an open_clip VisionTransformer (model.visual)"
        )
    return AdapterHooks(visual, cfg.blocks if blocks is None else tuple(blocks), cfg)
