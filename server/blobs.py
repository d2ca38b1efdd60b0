"""Content-addressed blob files: immutable, named by the sha256 of their bytes.

A blob is written temp -> fsync -> rename -> fsync(dir), so a blob file either is complete or
does not exist, and writing the same bytes twice is a no-op.
"""

from __future__ import annotations

import hashlib
import os
import threading
from pathlib import Path


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class BlobStore:
    """Immutable content-addressed files under ``<state>/blobs``."""

    def __init__(self, root: Path, fsync: bool = True) -> None:
        self.root = root
        self.fsync = fsync
        root.mkdir(parents=True, exist_ok=True)
        for leftover in root.glob("*.tmp"):  # from a write interrupted by a crash
            leftover.unlink()

    def path(self, digest: str) -> Path:
        return self.root / f"{digest}.safetensors"

    def put(self, data: bytes, digest: str | None = None) -> str:
        """Write ``data`` atomically under its sha256; returns the digest."""
        digest = digest or sha256_hex(data)
        final = self.path(digest)
        if final.exists():
            return digest
        tmp = self.root / f"{digest}.{os.getpid()}.{threading.get_ident()}.tmp"
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            if self.fsync:
                os.fsync(fh.fileno())
        os.replace(tmp, final)
        if self.fsync:
            _fsync_dir(self.root)
        return digest

    def get(self, digest: str) -> bytes:
        return self.path(digest).read_bytes()
