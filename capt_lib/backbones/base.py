"""The frozen CLIP backbone in the form every later stage uses."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
from PIL import Image


@dataclass(eq=False)
class Backbone:
    """A frozen open_clip ``CLIP`` model with its tokenizer and evaluation transform.

    The model is in eval mode with ``requires_grad=False`` on every weight. Later stages
    read the text tower's modules directly from ``model`` (``token_embedding``,
    ``positional_embedding``, ``transformer``, ``ln_final``, ``text_projection``,
    ``attn_mask``), as a CoOp-style prompt-fed text path needs them.
    """

    model: torch.nn.Module  # open_clip.model.CLIP, frozen
    tokenizer: Callable[[list[str]], torch.Tensor]  # texts -> (N, context_length) int64 token ids
    preprocess: Callable[[Image.Image], torch.Tensor]  # PIL image -> (3, image_size, image_size)
    name: str  # open_clip architecture name, or "MiniCLIP"
    pretrained: str | None  # open_clip pretrained tag, a checkpoint path, or a MiniCLIP recipe name
    key: str  # content key of the weights; part of every cache key built on this backbone
    image_size: int  # input side in pixels
    context_length: int  # text context length, equal to the tokenizer's
    random_weights: bool = False  # True when the weights are random, so results must be labelled as such
    info: dict = field(default_factory=dict)  # provenance: config, checkpoint hash, recipe, metrics

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def embed_dim(self) -> int:
        projection = self.model.text_projection
        if isinstance(projection, torch.nn.Linear):
            return int(projection.out_features)
        return int(projection.shape[-1])

    @torch.no_grad()
    def encode_text(self, texts: list[str], normalize: bool = True) -> torch.Tensor:
        """Encode ``texts`` with the frozen text tower: (N, embed_dim)."""
        tokens = self.tokenizer(texts).to(self.device)
        return self.model.encode_text(tokens, normalize=normalize)

    def visual_tokens(self, images: torch.Tensor) -> torch.Tensor:
        """Run the ViT up to and including its last block: (B, 1 + grid*grid, width).

        Together with ``visual_head`` this is exactly ``model.encode_image``. The split
        lets a module act on the last block's tokens, which are also what the token
        cache stores.
        """
        visual = self.model.visual
        x = visual._embeds(images)  # (B, 1 + grid*grid, width)
        return visual.transformer(x)  # (B, 1 + grid*grid, width)

    def visual_head(self, tokens: torch.Tensor) -> torch.Tensor:
        """Pool the last block's tokens and project them: (B, 1 + grid*grid, width) -> (B, embed_dim)."""
        visual = self.model.visual
        pooled, _ = visual._pool(tokens)  # (B, width)
        return pooled @ visual.proj if visual.proj is not None else pooled
