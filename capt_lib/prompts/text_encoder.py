"""The CLIP text tower fed with token embeddings instead of token ids.

Prompt learners (CoOp and its descendants) build the input embeddings themselves, with
learned context vectors in place of some words, so they need ``encode_text`` from the
embedding layer on. This module is that path for open_clip 3.3's ``CLIP``: its text
transformer is batch-first and takes the causal mask at call time.
"""

from __future__ import annotations

import torch
from open_clip.transformer import text_global_pool
from torch import nn

# The attributes of an open_clip ``CLIP`` that make up its text tower.
TEXT_TOWER_ATTRIBUTES = (
    "token_embedding",
    "positional_embedding",
    "transformer",
    "ln_final",
    "text_projection",
    "attn_mask",
    "text_pool_type",
)
POOL_TYPES = ("argmax", "eos", "first", "last")


class TextEncoder(nn.Module):
    """``CLIP.encode_text`` from the token embeddings on, without normalisation.

    The modules are references to the CLIP model's own (shared, not copied), so the
    encoder follows the model's weights and freezing. For the same token ids,
    ``TextEncoder(model)(model.token_embedding(ids), ids)`` equals
    ``model.encode_text(ids)``.
    """

    def __init__(self, clip_model: nn.Module):
        super().__init__()
        missing = [name for name in TEXT_TOWER_ATTRIBUTES if not hasattr(clip_model, name)]
        if missing:
            raise ValueError(
                f"{type(clip_model).__name__} has no text-tower attributes {missing}; TextEncoder needs an "
                "open_clip CLIP whose text modules sit on the model itself (not CustomTextCLIP or CoCa)"
            )
        if clip_model.text_pool_type not in POOL_TYPES:
            raise ValueError(
                f"text_pool_type={clip_model.text_pool_type!r} is not supported; TextEncoder pools one token "
                f"per prompt and supports {list(POOL_TYPES)}"
            )
        eos_id = getattr(clip_model, "text_eos_id", None)
        if clip_model.text_pool_type == "eos" and eos_id is None:
            raise ValueError("text_pool_type='eos' needs the model's text_eos_id, but it is None")

        self.token_embedding = clip_model.token_embedding
        self.positional_embedding = clip_model.positional_embedding
        self.transformer = clip_model.transformer
        self.ln_final = clip_model.ln_final
        self.text_projection = clip_model.text_projection
        self.pool_type = clip_model.text_pool_type
        self.eos_id = eos_id
        # A buffer, so the causal mask moves with the encoder. It is None when the model has no causal mask.
        self.register_buffer("attn_mask", clip_model.attn_mask, persistent=False)

    @property
    def context_length(self) -> int:
        return int(self.positional_embedding.shape[0])

    @property
    def width(self) -> int:
        return int(self.positional_embedding.shape[1])

    def embed_tokens(self, token_ids: torch.Tensor) -> torch.Tensor:
        """Look up the token embeddings: (N, L) ids -> (N, L, width)."""
        return self.token_embedding(token_ids)

    def forward(self, prompt_embeddings: torch.Tensor, tokenized_prompts: torch.Tensor) -> torch.Tensor:
        """Encode prompts given as embeddings: (N, L, width), (N, L) ids -> (N, embed_dim).

        ``tokenized_prompts`` only chooses the pooled position (the end-of-text token),
        so its ids need not match the embeddings anywhere else.
        """
        self._check_shapes(prompt_embeddings, tokenized_prompts)
        cast_dtype = self.transformer.get_cast_dtype()

        x = prompt_embeddings.to(cast_dtype) + self.positional_embedding.to(cast_dtype)  # (N, L, width)
        x = self.transformer(x, attn_mask=self.attn_mask)  # (N, L, width)
        x = self.ln_final(x)  # (N, L, width)

        pooled = text_global_pool(x, tokenized_prompts, self.pool_type, eos_token_id=self.eos_id)  # (N, width)
        return self._project(pooled)  # (N, embed_dim)

    def _project(self, pooled: torch.Tensor) -> torch.Tensor:
        if self.text_projection is None:
            return pooled
        if isinstance(self.text_projection, nn.Linear):
            return self.text_projection(pooled)
        return pooled @ self.text_projection

    def _check_shapes(self, prompt_embeddings: torch.Tensor, tokenized_prompts: torch.Tensor) -> None:
        expected = (self.context_length, self.width)
        if prompt_embeddings.dim() != 3 or tuple(prompt_embeddings.shape[1:]) != expected:
            raise ValueError(
                f"prompt_embeddings has shape {tuple(prompt_embeddings.shape)}; expected (N, {expected[0]}, "
                f"{expected[1]}) = (prompts, context length, text width)"
            )
        if tuple(tokenized_prompts.shape) != tuple(prompt_embeddings.shape[:2]):
            raise ValueError(
                f"tokenized_prompts has shape {tuple(tokenized_prompts.shape)}; expected "
                f"{tuple(prompt_embeddings.shape[:2])}, one token id per prompt position"
            )
