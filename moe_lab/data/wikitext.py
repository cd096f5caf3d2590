"""WikiText-2 (word level) as token-id streams for language modelling.

The files are the tokenized release (``wiki.{train,valid,test}.tokens``): words separated by
spaces, rare words already ``<unk>``, one paragraph or heading per line. Each non-empty line
becomes its words followed by ``<eos>``.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch

from moe_lab.data import paths

WIKITEXT_DIR = "wikitext-2"  # the course's copy (valid.txt and test.txt have known hashes)
DOWNLOAD_DIR = "wikitext-2-download"  # what load_wikitext2 downloads itself (checked by .sha256 records)
SPLITS = ("train", "valid", "test")
EOS = "<eos>"
UNK = "<unk>"


def tokenize(text: str) -> list[str]:
    """Words of every non-empty line, each line closed by ``<eos>``."""
    tokens = []
    for line in text.splitlines():
        words = line.split()
        if words:
            tokens.extend(words)
            tokens.append(EOS)
    return tokens


class Vocabulary:
    """Word <-> id mapping built from training tokens, most frequent first; unknown -> ``<unk>``."""

    def __init__(self, tokens: list[str]):
        counts = Counter(tokens)
        counts.setdefault(UNK, 0)
        self.words = [word for word, _ in sorted(counts.items(), key=lambda item: (-item[1], item[0]))]
        self.index = {word: i for i, word in enumerate(self.words)}

    def __len__(self) -> int:
        return len(self.words)

    def encode(self, tokens: list[str]) -> torch.Tensor:
        """int64 ids ``(len(tokens),)``; words outside the vocabulary map to ``<unk>``."""
        unk = self.index[UNK]
        return torch.tensor([self.index.get(word, unk) for word in tokens], dtype=torch.long)

    def decode(self, ids) -> list[str]:
        return [self.words[int(i)] for i in ids]


@dataclass
class TextData:
    """Token-id streams ``(num_tokens,)`` for training and test, with their vocabulary.

    ``train_split`` names the file the training stream came from: ``"valid"`` when the
    training split is not available offline (then the model trains on the validation split).
    """

    train: torch.Tensor
    test: torch.Tensor
    vocab: Vocabulary
    train_split: str
    source: Path


def _download(folder: Path) -> None:
    """Fetch WikiText-2 with ``datasets`` and write the three splits in the tokens layout."""
    from datasets import load_dataset

    dataset = load_dataset("Salesforce/wikitext", "wikitext-2-v1")
    folder.mkdir(parents=True, exist_ok=True)
    for split, name in [("train", "train"), ("validation", "valid"), ("test", "test")]:
        target = folder / f"{name}.txt"
        target.write_text("".join(row if row.endswith("\n") else row + "\n"
                                  for row in dataset[split]["text"]), encoding="utf-8")
        paths.write_sidecar(target)


def _split_path(split: str, data_dir) -> tuple[str, Path] | tuple[None, None]:
    """``(relative name, path)`` of a split: the course's copy first, then a download."""
    for folder in (WIKITEXT_DIR, DOWNLOAD_DIR):
        path = paths.find(f"{folder}/{split}.txt", data_dir)
        if path is not None:
            return f"{folder}/{split}.txt", path
    return None, None


def _missing_splits(data_dir) -> str | None:
    """The file(s) whose absence stops loading: ``test.txt``, or ``train.txt`` and ``valid.txt``."""
    missing = []
    if _split_path("test", data_dir)[1] is None:
        missing.append("test.txt")
    if _split_path("train", data_dir)[1] is None and _split_path("valid", data_dir)[1] is None:
        missing.append("valid.txt (or train.txt)")
    return " and ".join(f"{WIKITEXT_DIR}/{m}" for m in missing) or None


def load_wikitext2(data_dir: str | Path | None = None, *, download: bool | None = None,
                   max_train_tokens: int | None = None, max_test_tokens: int | None = None,
                   verbose: bool = True) -> TextData:
    """Load WikiText-2, training on ``train.txt`` and evaluating on ``test.txt``.

    Offline with only ``valid.txt`` and ``test.txt`` present (the course's data folder), the
    model trains on the validation split, and this is printed (``verbose``) and recorded in
    ``train_split``. The vocabulary comes from the training stream; test words outside it
    become ``<unk>``. ``max_*_tokens`` cut the streams (the profile's sizes, for instance).
    """
    lacking = _missing_splits(data_dir)
    if lacking:
        if not paths.may_download(download):
            raise paths.missing("WikiText-2", lacking, "datasets: Salesforce/wikitext",
                                "Downloads are off (download=False or MOE_LAB_OFFLINE).", data_dir)
        try:
            _download(paths.cache_dir() / DOWNLOAD_DIR)
        except Exception as error:  # network errors come in many types; all mean "not here"
            raise paths.missing("WikiText-2", lacking, "datasets: Salesforce/wikitext",
                                f"The download failed ({type(error).__name__}: {error}).",
                                data_dir) from None
    test_name, test_path = _split_path("test", data_dir)
    train_name, train_path = _split_path("train", data_dir)
    train_split = "train"
    if train_path is None:
        train_split, (train_name, train_path) = "valid", _split_path("valid", data_dir)
        if verbose:
            print(f"WikiText-2: no train.txt in the data folder, so training on the validation "
                  f"split ({train_path}) and evaluating on the test split.")
    for name, path in [(train_name, train_path), (test_name, test_path)]:
        paths.verify(path, name)
    train_tokens = tokenize(train_path.read_text(encoding="utf-8"))[:max_train_tokens]
    test_tokens = tokenize(test_path.read_text(encoding="utf-8"))[:max_test_tokens]
    vocab = Vocabulary(train_tokens)
    return TextData(train=vocab.encode(train_tokens), test=vocab.encode(test_tokens), vocab=vocab,
                    train_split=train_split, source=test_path.parent)


def unigram_perplexity(train: torch.Tensor, test: torch.Tensor, vocab_size: int, smoothing: float = 1.0
                       ) -> float:
    """Perplexity on ``test`` of the unigram model fitted on ``train`` (add-``smoothing`` counts):
    the baseline a language model must beat to show it uses any context or even word order."""
    if smoothing <= 0:
        raise ValueError(f"smoothing must be > 0, got {smoothing}")
    counts = torch.bincount(train, minlength=vocab_size).double() + smoothing
    log_probs = (counts / counts.sum()).log()
    return float(torch.exp(-log_probs[test].mean()))


def make_lm_blocks(ids: torch.Tensor, context_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Cut a ``(num_tokens,)`` stream into non-overlapping ``(N, context_size)`` input blocks
    and their next-token targets (the same blocks shifted by one). A short tail is dropped."""
    if ids.dim() != 1:
        raise ValueError(f"ids must be a 1-D stream of token ids, got shape {tuple(ids.shape)}")
    if isinstance(context_size, bool) or not isinstance(context_size, int) or context_size < 1:
        raise ValueError(f"context_size must be a positive int, got {context_size!r}")
    blocks = (len(ids) - 1) // context_size
    if blocks < 1:
        raise ValueError(f"ids has {len(ids)} tokens, too few for one block of {context_size}")
    usable = blocks * context_size
    return ids[:usable].view(blocks, context_size), ids[1:usable + 1].view(blocks, context_size)
