"""WikiText-2 as token-id streams for language modelling, at word or subword level.

The files are the tokenized release (``wiki.{train,valid,test}.tokens``): words separated by
spaces, rare words already ``<unk>``, one paragraph or heading per line. Each non-empty line
becomes its words followed by ``<eos>``. The vocabulary is learnt from the training stream only
(offline that is the validation split, see :func:`load_wikitext2`), in one of two ways:

* ``tokenizer="word"``: one id per distinct training word, most frequent first, optionally capped
  at ``vocab_size`` (the ``vocab_size - 1`` most frequent words plus ``<unk>``; rarer words and
  test words never seen in training become ``<unk>``). :class:`Vocabulary`.
* ``tokenizer="bpe"``: byte-pair encoding (the ``tokenizers`` package, trained offline and
  deterministically on the words of the whole training split, ``vocab_size`` pieces including
  ``<unk>`` and ``<eos>``; each word is split into pieces, a piece that starts a word is marked
  ``"▁"``). Rare words are spelled out in pieces instead of becoming ``<unk>``, so more of
  the next token depends on the tokens before it: context matters more than at word level. The
  trained tokenizer is cached as JSON in the data cache folder. :class:`SubwordVocabulary`.

Perplexities here are per token of the chosen vocabulary, measured after training on the
validation split: they are not comparable to published WikiText-2 results (word-level
perplexity over the full 33,278-word vocabulary, trained on the training split), nor across
tokenizers or vocabulary sizes. Compare models only on the same token stream.
"""

from __future__ import annotations

import os
import tempfile
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
TOKENIZERS = ("word", "bpe")


def tokenize(text: str) -> list[str]:
    """Words of every non-empty line, each line closed by ``<eos>``."""
    tokens = []
    for line in text.splitlines():
        words = line.split()
        if words:
            tokens.extend(words)
            tokens.append(EOS)
    return tokens


def _check_vocab_size(vocab_size, minimum: int) -> None:
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < minimum:
        raise ValueError(f"vocab_size must be an int >= {minimum}, got {vocab_size!r}")


class Vocabulary:
    """Word <-> id mapping built from training tokens, most frequent first; unknown -> ``<unk>``.

    ``max_size`` keeps only the ``max_size - 1`` most frequent words (ties by spelling) plus
    ``<unk>``; ``None`` keeps every training word.
    """

    def __init__(self, tokens: list[str], max_size: int | None = None):
        if max_size is not None:
            _check_vocab_size(max_size, 2)
        counts = Counter(tokens)
        unk_count = counts.pop(UNK, 0)
        ranked = sorted(counts.items(), key=lambda item: (-item[1], item[0]))
        if max_size is not None and len(ranked) >= max_size:
            unk_count += sum(count for _, count in ranked[max_size - 1:])
            ranked = ranked[:max_size - 1]
        ranked.append((UNK, unk_count))
        self.words = [word for word, _ in sorted(ranked, key=lambda item: (-item[1], item[0]))]
        self.index = {word: i for i, word in enumerate(self.words)}

    def __len__(self) -> int:
        return len(self.words)

    def encode(self, tokens: list[str]) -> torch.Tensor:
        """int64 ids ``(len(tokens),)``; words outside the vocabulary map to ``<unk>``."""
        unk = self.index[UNK]
        return torch.tensor([self.index.get(word, unk) for word in tokens], dtype=torch.long)

    def decode(self, ids) -> list[str]:
        return [self.words[int(i)] for i in ids]


def _lines(tokens: list[str]) -> list[list[str]]:
    """The words of each ``<eos>``-closed line (without the ``<eos>``); a last unclosed line too."""
    lines, line = [], []
    for token in tokens:
        if token == EOS:
            lines.append(line)
            line = []
        else:
            line.append(token)
    if line:
        lines.append(line)
    return lines


class SubwordVocabulary:
    """Byte-pair-encoding pieces <-> ids, learnt from training words with ``tokenizers``.

    Build one with :meth:`train` (or :meth:`load` a saved one). ``<unk>`` (id 0) and ``<eos>``
    (id 1) are single special pieces; every other word is split into pieces, the first of each
    word marked with ``"▁"``. Characters never seen in training become ``<unk>``.
    """

    SPECIAL = (UNK, EOS)

    def __init__(self, tokenizer):
        from tokenizers import Tokenizer

        if not isinstance(tokenizer, Tokenizer):
            raise TypeError(f"tokenizer must be a tokenizers.Tokenizer, got {type(tokenizer).__name__}")
        if [tokenizer.token_to_id(t) for t in self.SPECIAL] != [0, 1]:
            raise ValueError(f"tokenizer must map {self.SPECIAL} to ids 0 and 1")
        self.tokenizer = tokenizer

    @classmethod
    def train(cls, tokens: list[str], vocab_size: int) -> SubwordVocabulary:
        """Learn at most ``vocab_size`` pieces (special ones included; fewer only if the words
        of ``tokens`` run out of pairs to merge); the same tokens and size give the same pieces."""
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

        _check_vocab_size(vocab_size, len(cls.SPECIAL) + 1)
        tokenizer = Tokenizer(models.BPE(unk_token=UNK))
        tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
        tokenizer.decoder = decoders.Metaspace()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(cls.SPECIAL),
                                      show_progress=False)
        words = [" ".join(word for word in line if word != UNK) for line in _lines(tokens)]
        tokenizer.train_from_iterator([line for line in words if line], trainer)
        return cls(tokenizer)

    @classmethod
    def load(cls, path: str | Path) -> SubwordVocabulary:
        from tokenizers import Tokenizer

        return cls(Tokenizer.from_file(str(path)))

    def save(self, path: str | Path) -> None:
        self.tokenizer.save(str(path))

    def __len__(self) -> int:
        return self.tokenizer.get_vocab_size()

    @property
    def words(self) -> list[str]:
        """Every piece, by id."""
        return [self.tokenizer.id_to_token(i) for i in range(len(self))]

    def encode(self, tokens: list[str]) -> torch.Tensor:
        """int64 ids of the pieces of ``tokens`` (words, ``<unk>`` and ``<eos>``)."""
        ids = []
        eos = self.tokenizer.token_to_id(EOS)
        lines = _lines(tokens)
        closed = len(lines) - (1 if tokens and tokens[-1] != EOS else 0)
        for i, encoding in enumerate(self.tokenizer.encode_batch(lines, is_pretokenized=True,
                                                                 add_special_tokens=False)):
            ids.extend(encoding.ids)
            if i < closed:
                ids.append(eos)
        return torch.tensor(ids, dtype=torch.long)

    def decode(self, ids) -> list[str]:
        """The piece of each id (join them and replace ``"▁"`` by spaces to read the text)."""
        return [self.tokenizer.id_to_token(int(i)) for i in ids]


def _bpe_vocabulary(train_path: Path, tokens: list[str], vocab_size: int) -> SubwordVocabulary:
    """The BPE vocabulary of the training file, from the cache folder or trained (and cached)."""
    # the name records the training file and the training recipe (bump "v1" when the recipe changes)
    cached = paths.cache_dir() / WIKITEXT_DIR / f"bpe-v1-{vocab_size}-{paths.sha256(train_path)[:16]}.json"
    if cached.is_file():
        try:
            return SubwordVocabulary.load(cached)
        except Exception:  # a damaged cache file (tokenizers raises plain Exception): train again
            pass
    vocab = SubwordVocabulary.train(tokens, vocab_size)
    try:  # the cache is an optimisation: a read-only folder only costs a retraining next time
        cached.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=cached.parent, suffix=".tmp", delete=False) as handle:
            temporary = Path(handle.name)
        vocab.save(temporary)
        os.replace(temporary, cached)
    except OSError:
        pass
    return vocab


@dataclass
class TextData:
    """Token-id streams ``(num_tokens,)`` for training and test, with their vocabulary.

    ``train_split`` names the file the training stream came from: ``"valid"`` when the
    training split is not available offline (then the model trains on the validation split).
    """

    train: torch.Tensor
    test: torch.Tensor
    vocab: Vocabulary | SubwordVocabulary
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
                   verbose: bool = True, tokenizer: str = "word", vocab_size: int | None = None
                   ) -> TextData:
    """Load WikiText-2, training on ``train.txt`` and evaluating on ``test.txt``.

    Offline with only ``valid.txt`` and ``test.txt`` present (the course's data folder), the
    model trains on the validation split, and this is printed (``verbose``) and recorded in
    ``train_split``. ``max_*_tokens`` cut the streams (the profile's sizes, for instance).

    ``tokenizer="word"`` (the default): the vocabulary comes from the (cut) training stream,
    capped at ``vocab_size`` words if given; test words outside it become ``<unk>``.
    ``tokenizer="bpe"``: ``vocab_size`` (required) byte-pair pieces learnt from the whole
    training split, cached in the data cache folder; the cuts then count pieces. See the module
    docstring for why these perplexities are not comparable to published WikiText-2 results.
    """
    if tokenizer not in TOKENIZERS:
        raise ValueError(f"tokenizer must be one of {TOKENIZERS}, got {tokenizer!r}")
    if tokenizer == "bpe" and vocab_size is None:
        raise ValueError("vocab_size must be given with tokenizer='bpe' (the number of pieces)")
    if vocab_size is not None:
        _check_vocab_size(vocab_size, 2 if tokenizer == "word" else len(SubwordVocabulary.SPECIAL) + 1)
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
    train_tokens = tokenize(train_path.read_text(encoding="utf-8"))
    test_tokens = tokenize(test_path.read_text(encoding="utf-8"))
    if tokenizer == "bpe":
        vocab = _bpe_vocabulary(train_path, train_tokens, vocab_size)
        train_ids, test_ids = vocab.encode(train_tokens), vocab.encode(test_tokens)
        return TextData(train=train_ids[:max_train_tokens], test=test_ids[:max_test_tokens], vocab=vocab,
                        train_split=train_split, source=test_path.parent)
    train_tokens, test_tokens = train_tokens[:max_train_tokens], test_tokens[:max_test_tokens]
    vocab = Vocabulary(train_tokens, vocab_size)
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
