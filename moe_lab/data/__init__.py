"""Data for the course: a synthetic clustered task, CIFAR-10 and WikiText-2.

Real data is read from ``$MOE_LAB_DATA`` or the cache folder, or downloaded when allowed;
see :mod:`moe_lab.data.paths`.
"""

from moe_lab.data.cifar import CIFAR_CLASSES, ImageData, augment_images, load_cifar10, to_image_tensor
from moe_lab.data.paths import DataNotFoundError, cache_dir, search_dirs
from moe_lab.data.synthetic import ClusteredTask, group_into_sequences, make_clustered_task
from moe_lab.data.wikitext import (
    TextData,
    Vocabulary,
    load_wikitext2,
    make_lm_blocks,
    tokenize,
    unigram_perplexity,
)

__all__ = ["CIFAR_CLASSES", "ClusteredTask", "DataNotFoundError", "ImageData", "TextData",
           "Vocabulary", "cache_dir", "load_cifar10", "load_wikitext2", "make_clustered_task",
           "make_lm_blocks", "search_dirs", "to_image_tensor", "tokenize", "unigram_perplexity",
           "augment_images", "group_into_sequences"]
