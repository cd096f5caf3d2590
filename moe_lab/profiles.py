"""Every size the course uses, in one place, for two profiles.

``default`` is for a learner's 2-core laptop (each notebook in a few minutes); ``ci`` shrinks
data, models and epochs so the whole course executes in CI. Select one with the environment
variable ``MOE_LAB_PROFILE`` (read when :func:`get_profile` is called, never on import) or
by name.

The case-study models are built from a profile by :func:`moe_lab.models.build_image_classifier`,
:func:`moe_lab.models.build_language_model` and :func:`moe_lab.models.build_context_free_lm`,
and trained with ``moe_lab.train(model, data, **profile.train_options(task))``, so the notebooks
and ``python -m moe_lab study`` train the same models the same way.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from moe_lab.data.cifar import augment_images

TRAIN_TASKS = ("synthetic", "cifar10", "wikitext2")


@dataclass(frozen=True)
class Profile:
    """Sizes for one run of the course. All counts are per run, not per class unless named."""

    name: str
    # synthetic clustered task (notebooks 01-10)
    synthetic_train: int
    synthetic_test: int
    synthetic_epochs: int
    synthetic_batch_size: int  # small batches: the router gets many updates per epoch
    synthetic_lr: float
    # dispatch timings in notebooks (tokens)
    timing_tokens: int
    # CIFAR-10 subset
    cifar_train_per_class: int
    cifar_test_per_class: int
    cifar_epochs: int
    cifar_channels: tuple[int, ...]
    cifar_pool_size: int
    cifar_num_experts: int
    cifar_expert_size: int
    cifar_hidden_size: int
    cifar_lr: float
    cifar_batch_size: int
    # WikiText-2
    lm_train_tokens: int | None  # None: the whole training split
    lm_eval_tokens: int | None
    lm_context: int
    lm_steps: int
    lm_embedding_dim: int
    lm_num_layers: int
    lm_num_heads: int
    lm_num_experts: int
    lm_expert_size: int
    lm_lr: float
    lm_batch_size: int
    batch_size: int = 128
    # Settings shared by both profiles (override per profile where needed).
    # The synthetic models train with a cosine learning-rate decay: at a constant rate they stop
    # short of convergence, and any later fine-tune (of a compressed or an uncompressed copy)
    # "gains" accuracy that is really the training the base model never finished.
    synthetic_schedule: bool = True
    # CIFAR-10 classifier: top-k routing with the Switch balance loss, so experts specialise by
    # class instead of collapsing onto one expert (notebook 12).
    cifar_moe: str = "topk"
    cifar_k: int = 2
    cifar_balance_loss_weight: float = 0.01
    # WikiText-2 language model: vocabulary (see moe_lab.data.wikitext) and model options.
    lm_tokenizer: str = "bpe"
    lm_vocab_size: int | None = 1024
    lm_k: int = 2
    lm_balance_loss_weight: float = 0.01
    lm_dropout: float = 0.0
    lm_tie_weights: bool = False

    def train_options(self, task: str) -> dict:
        """Keyword arguments of :func:`moe_lab.train` for the base model of ``task``
        (``"synthetic"``, ``"cifar10"`` or ``"wikitext2"``); pass ``task="language_model"``
        yourself for WikiText-2."""
        if task == "synthetic":
            return dict(epochs=self.synthetic_epochs, lr=self.synthetic_lr,
                        batch_size=self.synthetic_batch_size, schedule=self.synthetic_schedule)
        if task == "cifar10":
            return dict(epochs=self.cifar_epochs, lr=self.cifar_lr, batch_size=self.cifar_batch_size,
                        transform=augment_images, schedule=True)
        if task == "wikitext2":  # the step count decides; epochs only needs to be large enough
            return dict(epochs=10_000, max_steps=self.lm_steps, lr=self.lm_lr, batch_size=self.lm_batch_size,
                        schedule=True)
        raise ValueError(f"task must be one of {TRAIN_TASKS}, got {task!r}")

    def wikitext_options(self) -> dict:
        """Keyword arguments of :func:`moe_lab.data.load_wikitext2` for this profile."""
        return dict(max_train_tokens=self.lm_train_tokens, max_test_tokens=self.lm_eval_tokens,
                    tokenizer=self.lm_tokenizer, vocab_size=self.lm_vocab_size)


PROFILES = {
    "default": Profile(name="default", synthetic_train=8000, synthetic_test=2000, synthetic_epochs=20,
                       synthetic_batch_size=16, synthetic_lr=1e-2,
                       timing_tokens=4096, cifar_train_per_class=1000, cifar_test_per_class=500,
                       cifar_epochs=30, cifar_channels=(16, 32, 64), cifar_pool_size=2, cifar_num_experts=4,
                       cifar_expert_size=128, cifar_hidden_size=128, cifar_lr=3e-3, cifar_batch_size=128,
                       lm_train_tokens=None, lm_eval_tokens=60_000, lm_context=64, lm_steps=3000,
                       lm_embedding_dim=64, lm_num_layers=2, lm_num_heads=4, lm_num_experts=4,
                       lm_expert_size=256, lm_lr=6e-3, lm_batch_size=32),
    "ci": Profile(name="ci", synthetic_train=2000, synthetic_test=1000, synthetic_epochs=8,
                  synthetic_batch_size=16, synthetic_lr=1e-2,
                  timing_tokens=1024, cifar_train_per_class=200, cifar_test_per_class=50,
                  cifar_epochs=6, cifar_channels=(16, 32), cifar_pool_size=2, cifar_num_experts=4,
                  cifar_expert_size=64, cifar_hidden_size=64, cifar_lr=3e-3, cifar_batch_size=64,
                  lm_train_tokens=40_000, lm_eval_tokens=20_000, lm_context=32, lm_steps=200,
                  lm_embedding_dim=64, lm_num_layers=1, lm_num_heads=2, lm_num_experts=4,
                  lm_expert_size=128, lm_lr=6e-3, lm_batch_size=16),
}


def get_profile(name: str | None = None) -> Profile:
    """The profile called ``name``, or ``$MOE_LAB_PROFILE``, or ``"default"``."""
    name = name or os.environ.get("MOE_LAB_PROFILE") or "default"
    if name not in PROFILES:
        raise ValueError(f"profile must be one of {sorted(PROFILES)} (from MOE_LAB_PROFILE or the "
                         f"name argument), got {name!r}")
    return PROFILES[name]
