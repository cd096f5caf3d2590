"""Data loaders: synthetic task, CIFAR-10 and WikiText-2 (real files via MOE_LAB_DATA)."""

import shutil
import urllib.error

import numpy as np
import pytest
import torch

from moe_lab.data import (
    DataNotFoundError,
    cifar,
    load_cifar10,
    load_wikitext2,
    make_clustered_task,
    make_lm_blocks,
    paths,
    to_image_tensor,
    tokenize,
    wikitext,
)


@pytest.fixture
def empty_cache(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    cache.mkdir()
    monkeypatch.setattr(paths, "cache_dir", lambda: cache)
    monkeypatch.delenv("MOE_LAB_DATA", raising=False)
    monkeypatch.delenv("MOE_LAB_OFFLINE", raising=False)
    return cache


def test_synthetic_task_is_deterministic_and_shaped():
    a, b = make_clustered_task(100, 50, seed=4), make_clustered_task(100, 50, seed=4)
    assert torch.equal(a.x_train, b.x_train) and torch.equal(a.y_test, b.y_test)
    assert a.x_train.shape == (100, 16) and a.y_train.shape == (100,) and a.cluster_test.shape == (50,)
    assert not torch.equal(a.x_train, make_clustered_task(100, 50, seed=5).x_train)
    assert set(a.y_train.tolist()) <= set(range(4)) and set(a.cluster_train.tolist()) == set(range(4))
    with pytest.raises(ValueError, match="num_classes must be >= 2"):
        make_clustered_task(10, 10, num_classes=1)


def test_cifar_subset_from_the_data_folder(data_dir):
    data = load_cifar10(data_dir, train_per_class=20, test_per_class=5)
    assert data.x_train.shape == (200, 32, 32, 3) and data.x_train.dtype == np.uint8
    assert np.bincount(data.y_train).tolist() == [20] * 10
    assert np.bincount(data.y_test).tolist() == [5] * 10
    assert data.classes[0] == "airplane" and len(data.classes) == 10
    full = load_cifar10(data_dir)
    assert full.x_train.shape == (10000, 32, 32, 3) and full.x_test.shape == (5000, 32, 32, 3)


def test_image_preprocessing_normalises_per_channel(data_dir):
    data = load_cifar10(data_dir, train_per_class=200)
    x = to_image_tensor(data.x_train)
    assert x.shape == (2000, 3, 32, 32) and x.dtype == torch.float32
    assert x.mean(dim=(0, 2, 3)).abs().max() < 0.1
    assert (x.std(dim=(0, 2, 3)) - 1).abs().max() < 0.1
    assert to_image_tensor(data.x_train[0]).shape == (1, 3, 32, 32)


def test_image_preprocessing_rejects_bad_input():
    with pytest.raises(TypeError, match="uint8"):
        to_image_tensor(np.zeros((2, 32, 32, 3), dtype=np.float32))
    with pytest.raises(ValueError, match=r"\(N, H, W, 3\)"):
        to_image_tensor(np.zeros((2, 3, 32, 32), dtype=np.uint8))


def test_offline_and_missing_gives_one_readable_error(empty_cache):
    with pytest.raises(DataNotFoundError) as error:
        load_cifar10(download=False)
    message = str(error.value)
    assert "MOE_LAB_DATA" in message and "torchvision" in message and "cifar10-subset.npz" in message
    with pytest.raises(DataNotFoundError, match="MOE_LAB_DATA"):
        load_wikitext2(download=False)


def test_offline_env_var_stops_downloads(empty_cache, monkeypatch):
    monkeypatch.setenv("MOE_LAB_OFFLINE", "1")
    monkeypatch.setattr(cifar, "_download", lambda target: pytest.fail("tried the network"))
    with pytest.raises(DataNotFoundError, match="Downloads are off"):
        load_cifar10()


def test_failed_download_is_reported_without_a_stack_of_library_errors(empty_cache, monkeypatch):
    def no_network(target):
        raise urllib.error.URLError("no route to host")

    monkeypatch.setattr(cifar, "_download", no_network)
    with pytest.raises(DataNotFoundError, match="download failed.*no route to host") as error:
        load_cifar10()
    assert error.value.__cause__ is None and error.value.__suppress_context__


def test_download_route_writes_the_course_format(empty_cache, monkeypatch):
    class FakeCIFAR10:  # stands in for torchvision's class: same attributes, tiny data
        def __init__(self, root, train, download):
            rng = np.random.default_rng(int(train))
            n = 60 if train else 30
            self.data = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
            self.targets = [i % 10 for i in range(n)]

    import torchvision.datasets
    monkeypatch.setattr(torchvision.datasets, "CIFAR10", FakeCIFAR10)
    real_download = cifar._download
    monkeypatch.setattr(cifar, "_download", lambda target: real_download(target, 4, 2))
    data = load_cifar10()
    assert data.x_train.shape == (40, 32, 32, 3) and np.bincount(data.y_train).tolist() == [4] * 10
    assert (empty_cache / "cifar10-torchvision.npz.sha256").is_file()  # its own name: not the course copy
    assert not (empty_cache / "cifar10-subset.npz").exists()
    assert load_cifar10().x_train.shape == (40, 32, 32, 3)  # found again, checked by its record


def test_damaged_file_fails_its_checksum(tmp_path, data_dir):
    shutil.copy(f"{data_dir}/wikitext-2/test.txt", tmp_path / "test.txt")
    (tmp_path / "wikitext-2").mkdir()
    (tmp_path / "wikitext-2" / "valid.txt").write_text("a b c\n")
    shutil.copy(f"{data_dir}/wikitext-2/test.txt", tmp_path / "wikitext-2" / "test.txt")
    with pytest.raises(ValueError, match="sha256"):
        load_wikitext2(tmp_path, download=False)


def test_data_dir_that_is_not_a_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("MOE_LAB_DATA", str(tmp_path / "nope"))
    with pytest.raises(DataNotFoundError, match="MOE_LAB_DATA points at"):
        load_cifar10(download=False)


def test_wikitext_offline_trains_on_valid_and_says_so(data_dir, capsys):
    data = load_wikitext2(data_dir, download=False)
    assert data.train_split == "valid"
    assert "training on the validation split" in capsys.readouterr().out
    assert len(data.train) == 213_886 + 3_760 - sum(1 for line in open(f"{data_dir}/wikitext-2/valid.txt")
                                                    if not line.split())
    assert data.train.dtype == torch.long and int(data.train.max()) < len(data.vocab)
    assert data.vocab.decode(data.vocab.encode(["the", "zzzunseen"])) == ["the", "<unk>"]
    small = load_wikitext2(data_dir, max_train_tokens=1000, max_test_tokens=500, verbose=False)
    assert len(small.train) == 1000 and len(small.test) == 500


def test_tokenize_and_blocks():
    assert tokenize(" = Title = \n \n a b \n") == ["=", "Title", "=", "<eos>", "a", "b", "<eos>"]
    inputs, targets = make_lm_blocks(torch.arange(11), 3)
    assert inputs.tolist() == [[0, 1, 2], [3, 4, 5], [6, 7, 8]]
    assert targets.tolist() == [[1, 2, 3], [4, 5, 6], [7, 8, 9]]
    with pytest.raises(ValueError, match="too few"):
        make_lm_blocks(torch.arange(3), 3)
    with pytest.raises(ValueError, match="context_size"):
        make_lm_blocks(torch.arange(30), 0)


def test_wikitext_download_route_writes_splits(empty_cache, monkeypatch):
    def fake_download(folder):
        folder.mkdir(parents=True)
        for name in ("train", "valid", "test"):
            (folder / f"{name}.txt").write_text(f" {name} words here \n \n")
            paths.write_sidecar(folder / f"{name}.txt")

    monkeypatch.setattr(wikitext, "_download", fake_download)
    data = load_wikitext2(verbose=False)
    assert data.train_split == "train" and data.source == empty_cache / "wikitext-2-download"
    assert data.vocab.decode(data.train) == ["train", "words", "here", "<eos>"]


def test_unigram_perplexity():
    from moe_lab.data import unigram_perplexity

    train = torch.tensor([0, 0, 1, 1])
    assert unigram_perplexity(train, torch.tensor([0, 1]), 2) == pytest.approx(2.0)
    skewed = unigram_perplexity(torch.tensor([0] * 98 + [1] * 2), torch.tensor([0, 0, 0]), 2, smoothing=1e-9)
    assert skewed == pytest.approx(1 / 0.98, rel=1e-6)
    with pytest.raises(ValueError, match="smoothing"):
        unigram_perplexity(train, train, 2, smoothing=0)


def test_augment_images_crops_and_flips_within_the_padding():
    from moe_lab.data import augment_images

    images = torch.arange(2 * 3 * 8 * 8, dtype=torch.float32).view(2, 3, 8, 8)
    out = augment_images(images, torch.Generator().manual_seed(0), padding=2)
    assert out.shape == images.shape
    same = augment_images(images, torch.Generator().manual_seed(0), padding=0)
    assert all(torch.equal(same[i], images[i]) or torch.equal(same[i], images[i].flip(2)) for i in range(2))
    with pytest.raises(ValueError, match=r"\(N, C, H, W\)"):
        augment_images(torch.zeros(3, 8, 8))


def fake_cifar(path, label=0):
    """A tiny file in the course layout, every label ``label``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as handle:
        np.savez(handle, x_train=np.zeros((10, 32, 32, 3), np.uint8), y_train=np.full(10, label),
                 x_test=np.zeros((10, 32, 32, 3), np.uint8), y_test=np.full(10, label),
                 classes=np.array(cifar.CIFAR_CLASSES))


def test_a_sidecar_cannot_override_the_known_hash(tmp_path, empty_cache):
    fake = tmp_path / "cifar10-subset.npz"  # the course's name, other content (every label 0)
    fake_cifar(fake)
    paths.write_sidecar(fake)  # a matching record beside it
    with pytest.raises(ValueError, match="not the course copy's") as error:
        load_cifar10(tmp_path, download=False)
    assert "Delete it" not in str(error.value)  # not our folder: says where downloads go instead
    assert str(empty_cache) in str(error.value) and "MOE_LAB_DATA" in str(error.value)
    (tmp_path / "wikitext-2").mkdir()
    for split in ("valid", "test"):
        (tmp_path / "wikitext-2" / f"{split}.txt").write_text("edited words\n")
        paths.write_sidecar(tmp_path / "wikitext-2" / f"{split}.txt")
    with pytest.raises(ValueError, match="not the course copy's"):
        load_wikitext2(tmp_path, download=False)


def test_a_damaged_download_says_delete_it(empty_cache):
    download = empty_cache / "cifar10-torchvision.npz"
    fake_cifar(download)
    paths.write_sidecar(download)
    assert load_cifar10(download=False).y_train.tolist() == [0] * 10
    fake_cifar(download, label=3)  # changed after its record was written
    with pytest.raises(ValueError, match="recorded when it was downloaded.*Delete it"):
        load_cifar10(download=False)
    (empty_cache / "cifar10-torchvision.npz.sha256").unlink()
    with pytest.raises(ValueError, match="no known hash and no .* download record"):
        load_cifar10(download=False)


@pytest.mark.parametrize("value, offline", [
    ("1", True), ("true", True), ("TRUE", True), ("yes", True), ("on", True), ("On", True), (" 1 ", True),
    ("0", False), ("false", False), ("no", False), ("off", False), ("OFF", False), ("", False),
])
def test_offline_switch_values(monkeypatch, value, offline):
    monkeypatch.setenv("MOE_LAB_OFFLINE", value)
    assert paths.offline() is offline and paths.may_download(None) is (not offline)
    assert paths.may_download(True) is True


@pytest.mark.parametrize("value", ["2", "offline", "y", "nein"])
def test_unclear_offline_values_are_refused(empty_cache, monkeypatch, value):
    monkeypatch.setenv("MOE_LAB_OFFLINE", value)
    with pytest.raises(ValueError, match="MOE_LAB_OFFLINE"):
        load_cifar10()


def test_missing_valid_split_is_named(tmp_path, empty_cache):
    (tmp_path / "wikitext-2").mkdir()
    (tmp_path / "wikitext-2" / "test.txt").write_text("a b\n")
    with pytest.raises(DataNotFoundError) as error:
        load_wikitext2(tmp_path, download=False)
    assert str(error.value).startswith("WikiText-2 not found: no wikitext-2/valid.txt (or train.txt) in ")
