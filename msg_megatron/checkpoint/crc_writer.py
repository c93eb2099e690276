"""CRC-32 of checkpoint files computed while megatron's writer processes write them.

The manifest needs every file's CRC-32. Reading each file back after the save costs a second pass
over the whole checkpoint, from disk once it no longer fits the page cache (a 1B model's 11.7 GB
on a 24 GB machine). Instead, during `dist_checkpointing.save` the data files are opened through
`crc_open`: a file whose `write` also updates a running CRC-32, and whose `close` leaves a sidecar
`<file>.crc32` ("crc bytes"). The manifest takes a file's CRC from its sidecar when the sidecar's
byte count equals the file's size, else it reads the file (e.g. a writer that seeked, which
invalidates the running CRC). Sidecars are removed before the manifest is written.

The hook replaces the name `open` in megatron's `filesystem_async` module (where each writer
process opens its file: `open_file = open`) for the duration of one save (patches.writer_open);
the writer processes are forked inside that save and inherit it. Verified against megatron-core 0.16.1 and by the
checkpoint tests, which check every manifest CRC against the file with `checkpoint.verify=full`.
"""
from __future__ import annotations

import builtins
import os
import zlib
from typing import Optional, Tuple

from .. import patches

SIDECAR = ".crc32"


class _CrcFile:
    """A binary file opened for writing whose sequential writes are checksummed on the way."""

    def __init__(self, path: str, mode: str):
        self._f = builtins.open(path, mode)
        self._path = path
        self._crc, self._bytes, self._valid = 0, 0, "w" in mode and "+" not in mode

    def write(self, data) -> int:
        n = self._f.write(data)
        if self._valid:
            view = memoryview(data).cast("B")
            self._crc = zlib.crc32(view[:n], self._crc)
            self._bytes += n
        return n

    def seek(self, *args):
        self._valid = False  # no longer a sequential stream: the manifest reads the file instead
        return self._f.seek(*args)

    def close(self) -> None:
        if self._f.closed:
            return
        self._f.close()
        if self._valid:
            with builtins.open(self._path + SIDECAR, "w") as f:
                f.write(f"{self._crc} {self._bytes}")

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False

    def __getattr__(self, name):  # tell, flush, fileno, closed, ...
        return getattr(self._f, name)


def crc_open(path, mode="r", *args, **kwargs):
    if "b" in mode and ("w" in mode) and not args and not kwargs:
        return _CrcFile(path, mode)
    return builtins.open(path, mode, *args, **kwargs)


def checksummed_writes():
    """During the block, megatron's checkpoint writer processes checksum what they write."""
    return patches.writer_open(crc_open)


def take_sidecar(path: str) -> Optional[Tuple[int, int]]:
    """(crc32, bytes) recorded while `path` was written, if any and if it covers the whole file;
    the sidecar is removed either way."""
    side = path + SIDECAR
    if not os.path.exists(side):
        return None
    try:
        with builtins.open(side) as f:
            crc, nbytes = (int(v) for v in f.read().split())
    except (OSError, ValueError):
        crc, nbytes = None, None
    os.remove(side)
    if crc is None or nbytes != os.path.getsize(path):
        return None
    return crc, nbytes
