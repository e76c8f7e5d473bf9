"""CoOp: learned context vectors in place of a hand-written prompt (Zhou et al., IJCV 2022).

Each class prompt is ``[SOT] [V_1] ... [V_n_ctx] classname . [EOT] padding``. The
``V_i`` are the learned context ``ctx``. Everything else comes from the frozen token
embedding and is stored once, as ``token_prefix`` (the start token) and
``token_suffix`` (class name, period, end token, padding).
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

from capt_lib.backbones.base import Backbone
from capt_lib.prompts.templates import format_classname
from capt_lib.prompts.text_encoder import TextEncoder

logger = logging.getLogger(__name__)

# NOTE: CoOp also places the class name in the "middle" or at the "front"; only "end" is implemented.
CLASS_TOKEN_POSITIONS = ("end",)
PLACEHOLDER = "X"  # word tokenized in place of each context token; its embedding is never used
CTX_INIT_STD = 0.02  # std of the random normal context initialisation


class PromptLearner(nn.Module):
    """Learned context ``ctx`` and the fixed token embeddings around it, for ``classnames``.

    ``ctx`` is (n_ctx, width), shared by all classes, or (C, n_ctx, width) with
    ``csc=True`` (class-specific context). Without ``ctx_init`` it starts as random
    normal noise with std 0.02 drawn from a generator seeded with ``seed``. With
    ``ctx_init`` (e.g. ``"a photo of a"``) it starts as the token embeddings of that
    text, and ``n_ctx`` becomes its token count, so the initial prompts equal the
    hand-written ``f"{ctx_init} {classname}."``.

    The tokenizer may be any callable texts -> (N, L) ids that puts one start token
    first and ends each text with an end token, found as the position of the largest
    id (or of the model's ``text_eos_id`` when its text pooling is ``"eos"``). Token
    positions are measured, never assumed.
    """

    def __init__(
        self,
        backbone: Backbone,
        classnames: list[str] | tuple[str, ...],
        n_ctx: int = 4,
        ctx_init: str | None = None,
        class_token_position: str = "end",
        csc: bool = False,
        seed: int = 0,
    ):
        super().__init__()
        if class_token_position not in CLASS_TOKEN_POSITIONS:
            raise ValueError(
                f"class_token_position={class_token_position!r} is not supported; choose one of "
                f"{list(CLASS_TOKEN_POSITIONS)}"
            )
        if not classnames:
            raise ValueError("classnames is empty; the prompt learner needs at least one class")
        if ctx_init is None and n_ctx < 1:
            raise ValueError(f"n_ctx={n_ctx} is invalid; it must be at least 1")

        self.classnames = tuple(classnames)
        self.class_token_position = class_token_position
        self.csc = csc
        self.ctx_init = ctx_init
        tokens = _PromptTokens(backbone)
        token_embedding = backbone.model.token_embedding

        ctx_text = _clean_ctx_init(ctx_init) if ctx_init is not None else " ".join([PLACEHOLDER] * n_ctx)
        self.n_ctx = tokens.count_ctx_tokens(ctx_text, expected=None if ctx_init is not None else n_ctx)
        if ctx_init is not None and self.n_ctx != n_ctx:
            logger.info("ctx_init=%r has %d tokens, so n_ctx=%d (not %d)", ctx_init, self.n_ctx, self.n_ctx, n_ctx)

        tokenized_prompts = tokens.tokenize_prompts(ctx_text, self.n_ctx, self.classnames)  # (C, L)
        tokenized_prompts = tokenized_prompts.to(token_embedding.weight.device)
        with torch.no_grad():
            embedding = token_embedding(tokenized_prompts).float()  # (C, L, width)

        # Non-persistent buffers: they follow the module across devices but are rebuilt from the
        # backbone and class names, so a state_dict holds only ctx and loads onto any class list.
        self.register_buffer("tokenized_prompts", tokenized_prompts, persistent=False)  # (C, L)
        self.register_buffer("token_prefix", embedding[:, :1, :].clone(), persistent=False)  # (C, 1, width)
        self.register_buffer(
            "token_suffix", embedding[:, 1 + self.n_ctx :, :].clone(), persistent=False
        )  # (C, L-1-n_ctx, width)

        self.ctx = nn.Parameter(self._initial_ctx(embedding, seed).to(embedding.device))

    def _initial_ctx(self, embedding: torch.Tensor, seed: int) -> torch.Tensor:
        """Return the starting context: ctx_init's embeddings or seeded noise.

        The shape is (n_ctx, width), or (C, n_ctx, width) with ``csc``. Class-specific
        contexts start as independent noise per class, or all as ctx_init's embeddings.
        """
        shape = (self.n_cls, self.n_ctx) if self.csc else (self.n_ctx,)
        if self.ctx_init is not None:
            logger.info("initialising %d context vectors from %r", self.n_ctx, self.ctx_init)
            ctx = embedding[0, 1 : 1 + self.n_ctx, :].clone()  # (n_ctx, width)
            return ctx.expand(*shape, -1).clone()  # (n_ctx, width) or (C, n_ctx, width)

        logger.info("initialising %d context vectors at random (std %g, seed %d)", self.n_ctx, CTX_INIT_STD, seed)
        generator = torch.Generator().manual_seed(seed)
        return torch.randn(*shape, embedding.shape[-1], generator=generator) * CTX_INIT_STD

    @property
    def n_cls(self) -> int:
        return len(self.classnames)

    def forward(self) -> torch.Tensor:
        """Assemble the prompt embeddings of every class: (C, L, width)."""
        ctx = self.ctx
        if ctx.dim() == 2:
            ctx = ctx.unsqueeze(0).expand(self.n_cls, -1, -1)  # (C, n_ctx, width)

        return torch.cat(
            [
                self.token_prefix,  # (C, 1, width) start token
                ctx,  # (C, n_ctx, width) learned context
                self.token_suffix,  # (C, L-1-n_ctx, width) class name, ".", end token, padding
            ],
            dim=1,
        )  # (C, L, width)


class CoOpModel(nn.Module):
    """Frozen CLIP with CoOp prompts: text features from ``prompt_learner``, logits against images.

    Only the prompt learner's ``ctx`` is trainable; every backbone weight must already
    be frozen. The text encoder stays in eval mode even while the model trains.
    """

    def __init__(self, backbone: Backbone, prompt_learner: PromptLearner):
        super().__init__()
        unfrozen = [name for name, p in backbone.model.named_parameters() if p.requires_grad]
        if unfrozen:
            shown = ", ".join(unfrozen[:5]) + (" ..." if len(unfrozen) > 5 else "")
            raise ValueError(
                f"the backbone has {len(unfrozen)} trainable weights ({shown}); CoOp trains only the "
                "context, so freeze the backbone (requires_grad=False) first"
            )

        self.prompt_learner = prompt_learner
        self.text_encoder = TextEncoder(backbone.model)
        self.register_buffer("logit_scale", backbone.model.logit_scale.detach().exp().float())  # () or (1,)
        logit_bias = getattr(backbone.model, "logit_bias", None)
        self.register_buffer("logit_bias", None if logit_bias is None else logit_bias.detach().float())

    @property
    def classnames(self) -> tuple[str, ...]:
        return self.prompt_learner.classnames

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def text_features(self) -> torch.Tensor:
        """Encode the current prompts: (C, embed_dim), L2-normalised."""
        prompts = self.prompt_learner()  # (C, L, width)
        features = self.text_encoder(prompts, self.prompt_learner.tokenized_prompts)  # (C, E)
        return F.normalize(features.float(), dim=-1)

    def logits(self, image_features: torch.Tensor, text_features: torch.Tensor | None = None) -> torch.Tensor:
        """Score image features (B, E) against every class: (B, C).

        The image features are L2-normalised here. Pass ``text_features`` to reuse one
        encoding of the prompts across several batches of images.
        """
        if text_features is None:
            text_features = self.text_features()  # (C, E)
        if image_features.dim() != 2 or image_features.shape[1] != text_features.shape[1]:
            raise ValueError(
                f"image_features has shape {tuple(image_features.shape)}; expected (B, {text_features.shape[1]})"
            )

        features = F.normalize(image_features.float(), dim=-1)  # (B, E)
        logits = self.logit_scale * features @ text_features.T  # (B, C)
        if self.logit_bias is not None:
            logits = logits + self.logit_bias
        return logits

    def forward(self, image_features: torch.Tensor) -> torch.Tensor:
        return self.logits(image_features)

    def train(self, mode: bool = True) -> "CoOpModel":
        super().train(mode)
        self.text_encoder.eval()
        return self


class _PromptTokens:
    """Tokenizer access for PromptLearner: end-token positions and the checks that slicing relies on."""

    def __init__(self, backbone: Backbone):
        self.tokenizer = backbone.tokenizer
        self.eos_id = backbone.model.text_eos_id if backbone.model.text_pool_type == "eos" else None
        self.check_start_token()

    def tokenize(self, texts: list[str]) -> torch.Tensor:
        return torch.as_tensor(self.tokenizer(texts), dtype=torch.long)

    def end_positions(self, token_ids: torch.Tensor) -> torch.Tensor:
        """Return the position of each row's end-of-text token: (N, L) -> (N,)."""
        if self.eos_id is not None:
            return (token_ids == self.eos_id).int().argmax(dim=-1)
        return token_ids.argmax(dim=-1)

    def check_start_token(self) -> None:
        end = int(self.end_positions(self.tokenize([""]))[0])
        if end != 1:
            raise ValueError(
                f"the tokenizer puts the end token of an empty text at position {end}; PromptLearner needs "
                "exactly one start token before the text (position 1), as CLIP tokenizers do"
            )

    def count_ctx_tokens(self, ctx_text: str, expected: int | None) -> int:
        """Return the number of tokens of ``ctx_text``, checked against ``expected`` when given."""
        count = int(self.end_positions(self.tokenize([ctx_text]))[0]) - 1
        if expected is not None and count != expected:
            raise ValueError(
                f"the tokenizer splits the {expected} placeholder words in {ctx_text!r} into {count} tokens; "
                "PromptLearner needs one token per placeholder word"
            )
        return count

    def tokenize_prompts(self, ctx_text: str, n_ctx: int, classnames: tuple[str, ...]) -> torch.Tensor:
        """Tokenize ``f"{ctx_text} {classname}."`` per class and check that its tokens line up.

        The class part is tokenized on its own as well: the prompt's tokens must be the
        start token, the context tokens, then exactly the class part's tokens, so that
        slicing at ``1 + n_ctx`` separates the context from the class name.
        """
        names = [format_classname(name) for name in classnames]
        ctx_ids = self.tokenize([ctx_text])  # (1, L)
        context_length = ctx_ids.shape[1]
        name_ids = self.tokenize([f"{name}." for name in names])  # (C, L)
        name_lengths = self.end_positions(name_ids) - 1  # (C,) tokens of the name and its period

        too_long = [
            f"{name!r} ({int(length)} tokens)"
            for name, length in zip(classnames, name_lengths)
            if 1 + n_ctx + int(length) + 1 > context_length
        ]
        if too_long:
            budget = context_length - 2 - n_ctx
            raise ValueError(
                f"class names too long for the context length {context_length} with n_ctx={n_ctx}: "
                f"{', '.join(too_long)}; the name and its period may use at most {budget} tokens"
            )

        prompt_ids = self.tokenize([f"{ctx_text} {name}." for name in names])  # (C, L)
        prompt_ends = self.end_positions(prompt_ids)  # (C,)
        for c, name in enumerate(classnames):
            length = int(name_lengths[c])
            lined_up = (
                int(prompt_ends[c]) == 1 + n_ctx + length
                and torch.equal(prompt_ids[c, : 1 + n_ctx], ctx_ids[0, : 1 + n_ctx])
                and torch.equal(prompt_ids[c, 1 + n_ctx : 1 + n_ctx + length], name_ids[c, 1 : 1 + length])
            )
            if not lined_up:
                raise ValueError(
                    f"the tokens of the prompt for class {name!r} are not the context tokens followed by the "
                    "class name's tokens; the tokenizer merges text across the boundary, so PromptLearner "
                    "cannot separate the context"
                )
        return prompt_ids


def _clean_ctx_init(ctx_init: str) -> str:
    text = ctx_init.replace("_", " ").strip()
    if not text:
        raise ValueError(f"ctx_init={ctx_init!r} is empty; pass None for a random context")
    return text
