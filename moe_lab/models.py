"""The case-study models: an image classifier (slide 12) and language models (slide 11).

Each puts a mixture layer (:class:`moe_lab.DenseMoE` or :class:`moe_lab.TopKMoE`) where the
deck does, under the attribute names the deck uses (``features``, ``moe``, ``classifier``;
``embedding``, ``output``), and keeps its constructor arguments in ``config``.

The ``build_*`` functions make the course's models from a :class:`moe_lab.profiles.Profile`, so
every notebook and ``python -m moe_lab study`` trains the same definition:
:func:`build_image_classifier` (notebooks 12-14, the study's ``cifar10`` task),
:func:`build_language_model` and :func:`build_context_free_lm` (notebook 11, the study's
``wikitext2`` task).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from moe_lab._checks import positive_int
from moe_lab.layers.dense import DenseMoE
from moe_lab.layers.registry import register_layer
from moe_lab.layers.topk import TopKMoE
from moe_lab.profiles import Profile

MOE_KINDS = ("soft", "topk")


def make_moe(kind: str, num_experts: int, input_size: int, expert_size: int, output_size: int,
             *, k: int = 2, activation: str | None = None, **options) -> nn.Module:
    """Build a ``"soft"`` (dense) or ``"topk"`` (sparse) mixture layer with these sizes."""
    if kind == "soft":
        if options:
            raise ValueError(f"options {sorted(options)} only apply to moe='topk'")
        return DenseMoE(num_experts, input_size, expert_size, output_size, activation=activation)
    if kind == "topk":
        return TopKMoE(num_experts, input_size, expert_size, output_size, k, activation=activation,
                       **options)
    raise ValueError(f"moe must be one of {MOE_KINDS}, got {kind!r}")


@register_layer
class ImageClassifierMoE(nn.Module):
    """Conv features, a mixture-of-experts layer, and a linear classifier (slide 12).

    ``features`` is a stack of conv blocks (two 3x3 conv + batch-norm + ReLU, then 2x2
    max-pool; one block per entry of ``channels``) followed by adaptive average pooling to
    ``pool_size x pool_size``. Its flattened output (``channels[-1] * pool_size**2`` wide)
    feeds ``moe`` (``num_experts`` experts of width ``expert_size``, output ``hidden_size``),
    then ReLU, dropout and ``classifier``.

    Shapes: images ``(batch, 3, H, W)`` as made by :func:`moe_lab.data.to_image_tensor`;
    logits ``(batch, num_classes)``.
    """

    def __init__(self, num_classes: int = 10, num_experts: int = 4, expert_size: int = 256, *,
                 channels: tuple[int, ...] = (32, 64, 128), pool_size: int = 2,
                 hidden_size: int = 256, moe: str = "soft", k: int = 2,
                 activation: str | None = "relu", dropout: float = 0.0,
                 moe_options: dict | None = None):
        super().__init__()
        positive_int("num_classes", num_classes)
        positive_int("pool_size", pool_size)
        if not channels:
            raise ValueError("channels must name at least one conv block width")
        for width in channels:
            positive_int("channels", width)
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        self.config = dict(num_classes=num_classes, num_experts=num_experts, expert_size=expert_size,
                           channels=list(channels), pool_size=pool_size, hidden_size=hidden_size,
                           moe=moe, k=k, activation=activation, dropout=dropout,
                           moe_options=dict(moe_options or {}))
        blocks, width_in = [], 3
        for width in channels:
            blocks += [nn.Conv2d(width_in, width, 3, padding=1, bias=False), nn.BatchNorm2d(width),
                       nn.ReLU(inplace=True),
                       nn.Conv2d(width, width, 3, padding=1, bias=False), nn.BatchNorm2d(width),
                       nn.ReLU(inplace=True), nn.MaxPool2d(2)]
            width_in = width
        blocks.append(nn.AdaptiveAvgPool2d(pool_size))
        self.features = nn.Sequential(*blocks)
        feature_size = channels[-1] * pool_size * pool_size
        self.moe = make_moe(moe, num_experts, feature_size, expert_size, hidden_size, k=k,
                            activation=activation, **(moe_options or {}))
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(hidden_size, num_classes)

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """The flattened features ``(batch, feature_size)`` that the MoE layer sees."""
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be (batch, 3, H, W), got shape {tuple(images.shape)}")
        return self.features(images).flatten(1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.dropout(F.relu(self.moe(self.embed(images)))))


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention. ``x`` is ``(batch, time, dim)``."""

    def __init__(self, dim: int, num_heads: int, dropout: float = 0.0):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"embedding_dim ({dim}) must be divisible by num_heads ({num_heads})")
        self.num_heads = num_heads
        self.dropout = dropout
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, time, dim = x.shape
        q, k, v = self.qkv(x).view(batch, time, 3, self.num_heads, dim // self.num_heads).unbind(2)
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                             is_causal=True,
                                             dropout_p=self.dropout if self.training else 0.0)
        return self.proj(out.transpose(1, 2).reshape(batch, time, dim))


class TransformerBlock(nn.Module):
    """Pre-norm block: ``x + attn(ln(x))``, then ``x + moe(ln(x))``."""

    def __init__(self, dim: int, num_heads: int, moe: nn.Module, dropout: float = 0.0):
        super().__init__()
        self.ln_attn = nn.LayerNorm(dim)
        self.attn = CausalSelfAttention(dim, num_heads, dropout)
        self.ln_moe = nn.LayerNorm(dim)
        self.moe = moe
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.dropout(self.attn(self.ln_attn(x)))
        return x + self.dropout(self.moe(self.ln_moe(x)))


@register_layer
class LanguageModelMoE(nn.Module):
    """A small causal Transformer whose feed-forward blocks are mixture-of-experts layers.

    The deck's language model (slide 11) maps each token's embedding through an MoE to the
    next-token logits, so it sees no context: it can at best learn bigram statistics. This
    one adds positions and causal self-attention, so perplexity reflects real modelling.

    Args:
        vocab_size: number of token ids.
        num_experts, expert_size, k, moe: the mixture in every block (experts use GELU).
        embedding_dim: model width.
        num_layers, num_heads: Transformer depth and heads.
        context_size: longest sequence accepted.
        tie_weights: share the output projection with the token embedding (stored once).
        moe_options: extra :class:`moe_lab.TopKMoE` options (capacity, loss weights...).

    Shapes: ``tokens`` is ``(batch, time)`` of int64 ids, ``time <= context_size``;
    logits are ``(batch, time, vocab_size)``.
    """

    def __init__(self, vocab_size: int, num_experts: int = 4, expert_size: int = 256,
                 embedding_dim: int = 128, *, num_layers: int = 2, num_heads: int = 4,
                 context_size: int = 64, k: int = 2, moe: str = "topk", dropout: float = 0.0,
                 tie_weights: bool = True, moe_options: dict | None = None):
        super().__init__()
        for name, value in [("vocab_size", vocab_size), ("embedding_dim", embedding_dim),
                            ("num_layers", num_layers), ("num_heads", num_heads),
                            ("context_size", context_size)]:
            positive_int(name, value)
        self.config = dict(vocab_size=vocab_size, num_experts=num_experts, expert_size=expert_size,
                           embedding_dim=embedding_dim, num_layers=num_layers, num_heads=num_heads,
                           context_size=context_size, k=k, moe=moe, dropout=dropout,
                           tie_weights=tie_weights, moe_options=dict(moe_options or {}))
        self.embedding = nn.Embedding(vocab_size, embedding_dim)
        self.position = nn.Embedding(context_size, embedding_dim)
        self.blocks = nn.ModuleList([
            TransformerBlock(embedding_dim, num_heads,
                             make_moe(moe, num_experts, embedding_dim, expert_size, embedding_dim,
                                      k=k, activation="gelu", **(moe_options or {})), dropout)
            for _ in range(num_layers)])
        self.norm = nn.LayerNorm(embedding_dim)
        self.output = nn.Linear(embedding_dim, vocab_size, bias=False)
        # GPT-2's scale for both tables: nn.Embedding's default N(0, 1) positions would drown the tokens
        nn.init.normal_(self.embedding.weight, std=0.02)
        nn.init.normal_(self.position.weight, std=0.02)
        if tie_weights:
            self.output.weight = self.embedding.weight

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        if not isinstance(tokens, torch.Tensor) or tokens.dtype != torch.long or tokens.dim() != 2:
            raise TypeError("tokens must be an int64 tensor of shape (batch, time)")
        time = tokens.shape[1]
        if time > self.config["context_size"]:
            raise ValueError(f"tokens has {time} positions, more than context_size "
                             f"({self.config['context_size']})")
        x = self.embedding(tokens) + self.position(torch.arange(time, device=tokens.device))
        for block in self.blocks:
            x = block(x)
        return self.output(self.norm(x))


@register_layer
class ContextFreeLM(nn.Module):
    """The deck's language model (slide 11): ``output(moe(embedding(token)))`` at every position.

    Each position sees only its own token, so the best it can learn is the next-token
    distribution given the current token (a bigram model): the baseline that shows whether a
    model with attention uses context at all. ``moe`` is a :class:`moe_lab.DenseMoE` of
    ``num_experts`` linear experts of width ``expert_size``; ``output`` has a bias.

    Shapes: ``tokens`` ``(batch, time)`` int64 ids; logits ``(batch, time, vocab_size)``.
    """

    def __init__(self, vocab_size: int, num_experts: int = 4, expert_size: int = 256,
                 embedding_dim: int = 128):
        super().__init__()
        positive_int("vocab_size", vocab_size)
        positive_int("embedding_dim", embedding_dim)
        self.config = dict(vocab_size=vocab_size, num_experts=num_experts, expert_size=expert_size,
                           embedding_dim=embedding_dim)
        self.embedding = nn.Embedding(vocab_size, embedding_dim)
        self.moe = DenseMoE(num_experts, embedding_dim, expert_size, embedding_dim)
        self.output = nn.Linear(embedding_dim, vocab_size)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        if not isinstance(tokens, torch.Tensor) or tokens.dtype != torch.long:
            raise TypeError("tokens must be an int64 tensor of shape (batch, time)")
        return self.output(self.moe(self.embedding(tokens)))


def _check_profile(profile) -> None:
    if not isinstance(profile, Profile):
        raise TypeError(f"profile must be a moe_lab.profiles.Profile (from get_profile()), "
                        f"got {type(profile).__name__}")


def build_image_classifier(profile: Profile, num_classes: int = 10, **overrides) -> ImageClassifierMoE:
    """The course's CIFAR-10 classifier with ``profile``'s sizes: conv features, a top-``cifar_k``
    :class:`moe_lab.TopKMoE` with the Switch balance loss (``cifar_balance_loss_weight``), a
    linear head. ``overrides`` replace constructor arguments of :class:`ImageClassifierMoE`
    (e.g. ``num_experts``, ``expert_size`` for a smaller recipient)."""
    _check_profile(profile)
    options = dict(num_experts=profile.cifar_num_experts, expert_size=profile.cifar_expert_size,
                   channels=profile.cifar_channels, pool_size=profile.cifar_pool_size,
                   hidden_size=profile.cifar_hidden_size, moe=profile.cifar_moe, k=profile.cifar_k,
                   moe_options={"balance_loss_weight": profile.cifar_balance_loss_weight}
                   if profile.cifar_moe == "topk" else None)
    options.update(overrides)
    return ImageClassifierMoE(num_classes, **options)


def build_language_model(profile: Profile, vocab_size: int, **overrides) -> LanguageModelMoE:
    """The course's WikiText-2 Transformer with ``profile``'s ``lm_*`` sizes: top-``lm_k`` MoE
    feed-forward blocks with the Switch balance loss, context ``lm_context``. ``overrides``
    replace constructor arguments of :class:`LanguageModelMoE`."""
    _check_profile(profile)
    options = dict(num_experts=profile.lm_num_experts, expert_size=profile.lm_expert_size,
                   embedding_dim=profile.lm_embedding_dim, num_layers=profile.lm_num_layers,
                   num_heads=profile.lm_num_heads, context_size=profile.lm_context, k=profile.lm_k,
                   dropout=profile.lm_dropout, tie_weights=profile.lm_tie_weights,
                   moe_options={"balance_loss_weight": profile.lm_balance_loss_weight})
    options.update(overrides)
    return LanguageModelMoE(vocab_size, **options)


def build_context_free_lm(profile: Profile, vocab_size: int) -> ContextFreeLM:
    """The deck's context-free model (:class:`ContextFreeLM`) with the same embedding width,
    experts and expert width as :func:`build_language_model`: the baseline to beat."""
    _check_profile(profile)
    return ContextFreeLM(vocab_size, profile.lm_num_experts, profile.lm_expert_size, profile.lm_embedding_dim)
