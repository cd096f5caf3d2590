"""WikiText-2 vocabularies: capped word vocabularies and BPE pieces (moe_lab.data.wikitext)."""

from collections import Counter

import pytest
import torch

from moe_lab.data import load_wikitext2, paths, tokenize
from moe_lab.data.wikitext import EOS, UNK, SubwordVocabulary, Vocabulary

TEXT = (" the cat sat on the mat \n the dog sat on the log \n a cat and a dog \n"
        " the cats sat \n <unk> sat on the mat \n")


@pytest.fixture
def cache(tmp_path, monkeypatch):
    folder = tmp_path / "cache"
    folder.mkdir()
    monkeypatch.setattr(paths, "cache_dir", lambda: folder)
    return folder


def reference_capped_words(tokens, max_size):
    """Slow reference: count, keep the max_size - 1 most frequent non-<unk> words (ties by spelling)."""
    counts = Counter(t for t in tokens if t != UNK)
    kept = sorted(counts, key=lambda w: (-counts[w], w))[:max_size - 1]
    unk = len(tokens) - sum(counts[w] for w in kept)
    return sorted(kept + [UNK], key=lambda w: (-(unk if w == UNK else counts[w]), w))


def read_words(pieces):
    """Words from BPE pieces: <unk> and <eos> stand alone, "\u2581" starts a word, others continue it."""
    words = []
    for piece in pieces:
        if piece in (UNK, EOS):
            words.append(piece)
        elif piece.startswith("\u2581"):
            words.append(piece[1:])
        else:
            words[-1] += piece
    return words


@pytest.mark.parametrize("max_size", [2, 3, 5, 8, 100])
def test_capped_word_vocabulary_matches_a_counting_reference(max_size):
    tokens = tokenize(TEXT)
    vocab = Vocabulary(tokens, max_size)
    assert vocab.words == reference_capped_words(tokens, max_size)
    assert len(vocab) == min(max_size, len(set(tokens)))
    ids = vocab.encode(tokens)
    expected = [w if w in vocab.index else UNK for w in tokens]
    assert vocab.decode(ids) == expected


def test_uncapped_word_vocabulary_is_unchanged():
    tokens = tokenize(TEXT)
    vocab = Vocabulary(tokens)
    assert set(vocab.words) == set(tokens) and vocab.decode(vocab.encode(tokens)) == tokens
    assert Vocabulary(["b", "a", "b"]).words == ["b", "a", UNK]  # <unk> is added even when unseen


@pytest.mark.parametrize("bad", [0, 1, 2.5, True, "10"])
def test_capped_vocabulary_rejects_bad_sizes(bad):
    with pytest.raises(ValueError, match="vocab_size"):
        Vocabulary(["a"], bad)


def test_bpe_is_deterministic_and_spells_every_seen_word():
    tokens = tokenize(TEXT)
    first, second = SubwordVocabulary.train(tokens, 30), SubwordVocabulary.train(tokens, 30)
    assert first.words == second.words and len(first) == 30
    assert len(SubwordVocabulary.train(tokens, 1000)) < 1000  # an upper bound: this corpus has fewer merges
    assert first.words[:2] == [UNK, EOS]
    ids = first.encode(tokens)
    assert torch.equal(ids, second.encode(tokens)) and ids.dtype == torch.long
    pieces = first.decode(ids)
    assert pieces.count(EOS) == tokens.count(EOS) and pieces.count(UNK) == tokens.count(UNK)
    assert read_words(pieces) == tokens
    assert len(ids) < len("".join(tokens))  # pieces, not characters


def test_bpe_handles_unseen_characters_and_an_unclosed_line():
    vocab = SubwordVocabulary.train(tokenize(TEXT), 30)
    pieces = vocab.decode(vocab.encode(["cat", "zebra", EOS, "the"]))
    assert pieces.count(EOS) == 1 and pieces[-1] != EOS  # no <eos> is invented for the open last line
    assert UNK in pieces  # z, e, b, r never occur in training
    assert vocab.encode([]).tolist() == []


def test_bpe_rejects_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="vocab_size"):
        SubwordVocabulary.train(tokenize(TEXT), 2)
    with pytest.raises(TypeError, match="tokenizer"):
        SubwordVocabulary("not a tokenizer")


def test_bpe_save_load_round_trip(tmp_path):
    vocab = SubwordVocabulary.train(tokenize(TEXT), 35)
    vocab.save(tmp_path / "bpe.json")
    again = SubwordVocabulary.load(tmp_path / "bpe.json")
    assert again.words == vocab.words
    assert torch.equal(again.encode(tokenize(TEXT)), vocab.encode(tokenize(TEXT)))


def test_load_wikitext2_with_bpe_caches_the_tokenizer(data_dir, cache):
    data = load_wikitext2(data_dir, tokenizer="bpe", vocab_size=512, verbose=False)
    cached = list((cache / "wikitext-2").glob("bpe-v1-512-*.json"))
    assert len(cached) == 1
    assert len(data.vocab) == 512 and int(data.train.max()) < 512 and int(data.test.max()) < 512
    words = tokenize(open(f"{data_dir}/wikitext-2/valid.txt", encoding="utf-8").read())
    assert len(data.train) > len(words)  # rare words are spelled in several pieces
    assert int((data.train == 1).sum()) == words.count(EOS)
    again = load_wikitext2(data_dir, tokenizer="bpe", vocab_size=512, verbose=False,
                           max_train_tokens=1000, max_test_tokens=700)
    assert again.vocab.words == data.vocab.words  # read back from the cache
    assert torch.equal(again.train, data.train[:1000]) and torch.equal(again.test, data.test[:700])
    cached[0].write_text("not json")  # a damaged cache is trained again and rewritten
    rebuilt = load_wikitext2(data_dir, tokenizer="bpe", vocab_size=512, verbose=False)
    assert rebuilt.vocab.words == data.vocab.words
    assert SubwordVocabulary.load(cached[0]).words == data.vocab.words


def test_load_wikitext2_with_a_capped_word_vocabulary(data_dir):
    data = load_wikitext2(data_dir, tokenizer="word", vocab_size=1000, verbose=False)
    full = load_wikitext2(data_dir, verbose=False)
    assert len(data.vocab) == 1000 and data.vocab.words == reference_capped_words(
        full.vocab.decode(full.train), 1000)
    unk = data.vocab.index[UNK]
    assert (data.train == unk).float().mean() > (full.train == full.vocab.index[UNK]).float().mean()


def test_load_wikitext2_rejects_bad_tokenizer_options(data_dir):
    with pytest.raises(ValueError, match="tokenizer must be one of"):
        load_wikitext2(data_dir, tokenizer="char", verbose=False)
    with pytest.raises(ValueError, match="vocab_size must be given"):
        load_wikitext2(data_dir, tokenizer="bpe", verbose=False)
    with pytest.raises(ValueError, match="vocab_size"):
        load_wikitext2(data_dir, tokenizer="bpe", vocab_size=2, verbose=False)
