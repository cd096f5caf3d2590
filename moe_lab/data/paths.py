"""Where data files live, how they are checked, and the one error for missing data.

A file is looked up, in order, in ``$MOE_LAB_DATA`` (if set) and in the cache folder: the
repository's ``data/`` folder when ``moe_lab`` runs from a checkout, else
``~/.cache/moe_lab``. Downloads are written to the cache folder. Set ``MOE_LAB_OFFLINE=1``
(or pass ``download=False``) to never try the network.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

DATA_ENV = "MOE_LAB_DATA"
OFFLINE_ENV = "MOE_LAB_OFFLINE"

# sha256 of the files in the course's offline data folder (see data/README.md).
KNOWN_SHA256 = {
    "cifar10-subset.npz": "fa7382e75d6b0f474485939b198017cd08d6dd954e1e46552045738626880563",
    "wikitext-2/valid.txt": "f0737ed31fc1329026e95cb8b98e19c2a182c39c240ab909dc31abf2f8af58e8",
    "wikitext-2/test.txt": "d790b833ef8cf03a90db7bf1271b7520b83c45ce07ba3c1a9699df81e239eca0",
}


class DataNotFoundError(FileNotFoundError):
    """A data file is missing and could not be downloaded."""


def cache_dir() -> Path:
    """The folder downloads go to: the checkout's ``data/`` or ``~/.cache/moe_lab``."""
    repo_data = Path(__file__).resolve().parents[2] / "data"
    if (repo_data / "README.md").is_file() and os.access(repo_data, os.W_OK):
        return repo_data
    return Path.home() / ".cache" / "moe_lab"


def search_dirs(data_dir: str | Path | None = None) -> list[Path]:
    """Folders searched for data, in order: ``data_dir`` or ``$MOE_LAB_DATA``, then the cache."""
    first = data_dir if data_dir is not None else os.environ.get(DATA_ENV)
    dirs = []
    if first:
        first = Path(first).expanduser()
        if not first.is_dir():
            source = "data_dir" if data_dir is not None else f"${DATA_ENV}"
            raise DataNotFoundError(f"{source} points at {first}, which is not a folder")
        dirs.append(first)
    dirs.append(cache_dir())
    return dirs


def find(relative: str, data_dir: str | Path | None = None) -> Path | None:
    """The first existing ``relative`` path in :func:`search_dirs`, or ``None``."""
    for folder in search_dirs(data_dir):
        if (folder / relative).is_file():
            return folder / relative
    return None


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def verify(path: Path, relative: str) -> Path:
    """Check ``path`` against the known hash of ``relative`` or its ``.sha256`` sidecar."""
    actual = sha256(path)
    sidecar = path.with_name(path.name + ".sha256")
    expected = {KNOWN_SHA256.get(relative)}
    if sidecar.is_file():
        expected.add(sidecar.read_text().split()[0])
    if actual not in expected:
        raise ValueError(f"{path} has sha256 {actual}, which matches neither the course's copy nor "
                         f"its download record: the file is damaged or not the expected one. "
                         f"Delete it to download it again.")
    return path


def write_sidecar(path: Path) -> None:
    """Record the hash of a file this package downloaded, for :func:`verify`."""
    path.with_name(path.name + ".sha256").write_text(f"{sha256(path)}  {path.name}\n")


def may_download(download: bool | None) -> bool:
    """``download`` if given, else True unless ``$MOE_LAB_OFFLINE`` is set to a true value."""
    if download is not None:
        return bool(download)
    return os.environ.get(OFFLINE_ENV, "").lower() not in {"1", "true", "yes"}


def missing(what: str, relative: str, route: str, reason: str,
            data_dir: str | Path | None = None) -> DataNotFoundError:
    """The readable error for a data file that is not there and could not be fetched."""
    searched = ", ".join(str(d) for d in search_dirs(data_dir))
    return DataNotFoundError(
        f"{what} not found: no {relative} in {searched}. {reason}\n"
        f"Either point {DATA_ENV} at a folder holding {relative} "
        f"(e.g. export {DATA_ENV}=/path/to/data), or go online and let moe_lab download it "
        f"({route}) into {cache_dir()}.")
