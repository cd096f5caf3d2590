"""Where data files live, how they are checked, and the one error for missing data.

A file is looked up, in order, in ``$MOE_LAB_DATA`` (if set) and in the cache folder: the
repository's ``data/`` folder when ``moe_lab`` runs from a checkout, else
``~/.cache/moe_lab``. Downloads are written to the cache folder. Set ``MOE_LAB_OFFLINE=1``
(or ``true``, ``yes``, ``on``; or pass ``download=False``) to never try the network.

Checks: a file under a course name (``cifar10-subset.npz``, ``wikitext-2/{valid,test}.txt``)
must have the course copy's known sha256, wherever it is; nothing overrides that. What
``moe_lab`` downloads itself is stored under its own names (``cifar10-torchvision.npz``,
``wikitext-2-download/``) with a ``.sha256`` record written at download time, which catches
a damaged download (not a deliberate edit: whoever can write the file can write its record).
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


OFFLINE_VALUES = {"1": True, "true": True, "yes": True, "on": True,
                  "0": False, "false": False, "no": False, "off": False, "": False}


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


def _inside(path: Path, folder: Path) -> bool:
    try:
        path.resolve().relative_to(folder.resolve())
        return True
    except ValueError:
        return False


def _remedy(path: Path) -> str:
    """What to do about a bad file: deleting it only helps where moe_lab downloads to."""
    if _inside(path, cache_dir()) and os.access(path.parent, os.W_OK):
        return f"Delete it (and any {path.name}.sha256 beside it) to download it again."
    return (f"It is in a folder moe_lab does not manage: replace it with the course's copy, or point "
            f"{DATA_ENV} elsewhere (or unset it) so that moe_lab downloads a fresh copy into {cache_dir()}.")


def verify(path: Path, relative: str) -> Path:
    """Check ``path`` (found as ``relative``) against the course copy's known hash if
    ``relative`` has one (authoritative: a ``.sha256`` beside it is ignored), else against the
    ``.sha256`` record written when moe_lab downloaded it. ``ValueError`` otherwise."""
    actual = sha256(path)
    known = KNOWN_SHA256.get(relative)
    if known is not None:
        if actual != known:
            raise ValueError(f"{path} has sha256 {actual}, not the course copy's {known}: the file is "
                             f"damaged or not the expected one. {_remedy(path)}")
        return path
    sidecar = path.with_name(path.name + ".sha256")
    if not sidecar.is_file():
        raise ValueError(f"{path} has no known hash and no {sidecar.name} download record, so it cannot be "
                         f"checked. {_remedy(path)}")
    recorded = (sidecar.read_text(errors="replace").split() or [""])[0]
    if actual != recorded:
        raise ValueError(f"{path} has sha256 {actual}, not the {recorded!r} recorded when it was downloaded: "
                         f"the file is damaged. {_remedy(path)}")
    return path


def write_sidecar(path: Path) -> None:
    """Record the hash of a file this package downloaded, for :func:`verify`."""
    path.with_name(path.name + ".sha256").write_text(f"{sha256(path)}  {path.name}\n")


def offline() -> bool:
    """``$MOE_LAB_OFFLINE`` as a switch: ``1/true/yes/on`` (any case) mean offline, ``0/false/no/off``
    or empty or unset mean online; anything else is a ``ValueError`` naming the variable."""
    value = os.environ.get(OFFLINE_ENV, "")
    if value.strip().lower() not in OFFLINE_VALUES:
        raise ValueError(f"{OFFLINE_ENV}={value!r} is not understood: use 1/true/yes/on to stay offline or "
                         f"0/false/no/off to allow downloads")
    return OFFLINE_VALUES[value.strip().lower()]


def may_download(download: bool | None) -> bool:
    """``download`` if given, else True unless ``$MOE_LAB_OFFLINE`` says offline (:func:`offline`)."""
    if download is not None:
        return bool(download)
    return not offline()


def missing(what: str, relative: str, route: str, reason: str,
            data_dir: str | Path | None = None) -> DataNotFoundError:
    """The readable error for a data file that is not there and could not be fetched."""
    searched = ", ".join(str(d) for d in search_dirs(data_dir))
    return DataNotFoundError(
        f"{what} not found: no {relative} in {searched}. {reason}\n"
        f"Either point {DATA_ENV} at a folder holding {relative} "
        f"(e.g. export {DATA_ENV}=/path/to/data), or go online and let moe_lab download it "
        f"({route}) into {cache_dir()}.")
