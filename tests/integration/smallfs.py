"""Small real filesystems for the storage-fault tests: mounted, filled, made read-only.

:func:`small_filesystem` mounts a tmpfs of a few MiB on a directory (a
loop-mounted ext4 image where tmpfs cannot be mounted) and always unmounts
it, even when the test fails; where neither can be mounted (not root, no
``mount``) the test is skipped with the reason.  :func:`fill` writes a file
until the disk refuses (``ENOSPC``); removing it gives the space back.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

#: The size of each filesystem: room for a daemon's database and a few job logs.
SIZE_MIB = 8
FILLER = "filler"


def _run(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, check=False)


def _mount_tmpfs(path: Path) -> str:
    """Mount a tmpfs on ``path``; what went wrong, or ''."""
    if shutil.which("mount") is None:
        return "no mount command"
    done = _run("mount", "-t", "tmpfs", "-o", f"size={SIZE_MIB}m,mode=0755", "sna-test", str(path))
    return "" if done.returncode == 0 else (done.stderr.strip() or f"exit {done.returncode}")


def _mount_image(path: Path, image: Path) -> str:
    """Mount an ext4 image file on ``path`` through a loop device; what went wrong, or ''."""
    if shutil.which("mkfs.ext4") is None:
        return "no mkfs.ext4"
    with open(image, "wb") as f:
        f.truncate(SIZE_MIB * 1024 * 1024)
    # No reserved blocks: full means full for root too.
    made = _run("mkfs.ext4", "-q", "-F", "-m", "0", str(image))
    if made.returncode != 0:
        return made.stderr.strip() or f"mkfs.ext4 exit {made.returncode}"
    done = _run("mount", "-o", "loop", str(image), str(path))
    return "" if done.returncode == 0 else (done.stderr.strip() or f"exit {done.returncode}")


def _unmount(path: Path) -> None:
    for _ in range(50):
        if _run("umount", str(path)).returncode == 0 or not os.path.ismount(path):
            return
        time.sleep(0.1)  # a process of the test may still hold a file there
    _run("umount", "-l", str(path))


@contextlib.contextmanager
def small_filesystem(path: Path) -> Iterator[Path]:
    """A fresh filesystem of :data:`SIZE_MIB` MiB mounted on ``path`` for the block."""
    path.mkdir(parents=True, exist_ok=True)
    image = path.parent / f".{path.name}.img"
    problem = _mount_tmpfs(path)
    if problem:
        fallback = _mount_image(path, image)
        if fallback:
            image.unlink(missing_ok=True)
            pytest.skip(
                f"cannot mount a small filesystem on {path} (tmpfs: {problem}; "
                f"loop image: {fallback}); these tests need root"
            )
    try:
        yield path
    finally:
        _unmount(path)
        image.unlink(missing_ok=True)


def fill(root: Path) -> Path:
    """Write a file in ``root`` until its disk is full; the file, to remove for room."""
    filler = root / FILLER
    chunk = b"\0" * (64 * 1024)
    with open(filler, "ab", buffering=0) as f:
        for size in (len(chunk), 4096, 512, 1):
            while True:
                try:
                    f.write(chunk[:size])
                except OSError as e:
                    if e.errno not in (errno.ENOSPC, errno.EDQUOT):
                        raise
                    break
    return filler


def make_read_only(root: Path) -> None:
    done = _run("mount", "-o", "remount,ro", str(root))
    if done.returncode != 0:
        pytest.skip(f"cannot remount {root} read-only: {done.stderr.strip()}")
