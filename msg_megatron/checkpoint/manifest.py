"""The manifest of a checkpoint directory: every file's size and CRC-32, written last.

A step directory is complete only if `manifest.json` exists and every file it lists is there with
its recorded size (always checked on load) and checksum (checked with `full=True`, e.g.
`checkpoint.verify=full`). The manifest is written inside the temporary directory after all ranks
finished writing, and the directory is renamed only then, so a kill at any moment leaves either no
step directory or a complete one; a later truncation or corruption is reported by file name.
"""
from __future__ import annotations

import json
import os
import zlib
from concurrent.futures import ThreadPoolExecutor
from typing import Dict, List, Optional

from .crc_writer import SIDECAR, take_sidecar

MANIFEST = "manifest.json"


class IncompleteCheckpoint(RuntimeError):
    """A checkpoint directory whose files do not match its manifest (or that has none)."""


def _crc32(path: str, chunk: int = 1 << 24) -> int:
    # one reused buffer (no allocation per block); zlib releases the GIL, so files checksum in parallel threads
    buf = bytearray(chunk)
    view = memoryview(buf)
    crc = 0
    with open(path, "rb", buffering=0) as f:
        while True:
            n = f.readinto(buf)
            if not n:
                return crc
            crc = zlib.crc32(view[:n], crc)


def list_files(root: str) -> List[str]:
    out = []
    for dirpath, _, files in os.walk(root):
        for name in files:
            rel = os.path.relpath(os.path.join(dirpath, name), root)
            if rel != MANIFEST and not rel.endswith(SIDECAR):
                out.append(rel)
    return sorted(out)


def checksum_files(root: str, files: List[str], rank: int = 0, world: int = 1) -> Dict[str, dict]:
    """Size and CRC-32 of this rank's share of `files` (file i is handled by rank i % world): the
    CRC recorded while it was written if there is one, else read in parallel threads."""
    mine = [rel for i, rel in enumerate(files) if i % world == rank]
    # a CRC recorded while the file was written (crc_writer) saves reading it back
    recorded = {rel: take_sidecar(os.path.join(root, rel)) for rel in mine}
    threads = max(1, min(len(mine), (os.cpu_count() or 1) // max(1, _local_ranks())))
    with ThreadPoolExecutor(threads) as pool:
        crcs = list(pool.map(lambda rel: recorded[rel][0] if recorded[rel] else _crc32(os.path.join(root, rel)), mine))
    return {rel: {"bytes": os.path.getsize(os.path.join(root, rel)), "crc32": crc} for rel, crc in zip(mine, crcs)}


def _local_ranks() -> int:
    """Processes sharing this node's cores (torchrun / SLURM set it)."""
    for var in ("LOCAL_WORLD_SIZE", "SLURM_NTASKS_PER_NODE"):
        try:
            return int(os.environ[var].split("(")[0])
        except (KeyError, ValueError):
            continue
    return 1


def write_manifest(root: str, entries: Dict[str, dict]) -> None:
    tmp = os.path.join(root, MANIFEST + ".tmp")
    with open(tmp, "w") as f:
        json.dump({"files": entries}, f, indent=0, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, os.path.join(root, MANIFEST))


def verify_manifest(root: str, full: bool = False, rank: int = 0, world: int = 1) -> None:
    """Raise IncompleteCheckpoint naming the first problem: no manifest, a missing file, a size or
    checksum that differs. Every file's size is checked; with `full` also the CRC-32 of this rank's
    share of the files (file i by rank i % world: the ranks of a job read the checkpoint once between
    them, and the caller agrees on the result), read in parallel threads."""
    path = os.path.join(root, MANIFEST)
    if not os.path.exists(path):
        raise IncompleteCheckpoint(f"`{root}` has no {MANIFEST}: the save did not finish")
    try:
        with open(path) as f:
            entries = json.load(f)["files"]
    except (json.JSONDecodeError, KeyError) as e:
        raise IncompleteCheckpoint(f"`{path}` is corrupt ({e})") from None
    for rel, want in entries.items():
        file = os.path.join(root, rel)
        if not os.path.exists(file):
            raise IncompleteCheckpoint(f"`{file}` is missing (listed in the manifest)")
        size = os.path.getsize(file)
        if size != want["bytes"]:
            raise IncompleteCheckpoint(f"`{file}` has {size} bytes, the manifest says {want['bytes']} (truncated?)")
    if not full:
        return
    mine = [rel for i, rel in enumerate(sorted(entries)) if i % world == rank]
    threads = max(1, min(len(mine), (os.cpu_count() or 1) // max(1, _local_ranks())))
    with ThreadPoolExecutor(threads) as pool:
        crcs = list(pool.map(lambda rel: _crc32(os.path.join(root, rel)), mine))
    for rel, crc in zip(mine, crcs):
        if crc != entries[rel]["crc32"]:
            raise IncompleteCheckpoint(f"`{os.path.join(root, rel)}` fails its CRC-32 check (corrupted)")


def step_dirs(save_dir: str) -> List[str]:
    """The `step_<N>` directory names in `save_dir`, oldest first by the number N (as text,
    `step_1000000` would sort before `step_999999`)."""
    found = []
    for d in os.listdir(save_dir):
        if d.startswith("step_") and d[len("step_"):].isdigit():
            found.append((int(d[len("step_"):]), d))
    return [d for _, d in sorted(found)]


def newest_complete(save_dir: str, full: bool = False, skip: Optional[str] = None):
    """(newest step directory that verifies, [(rejected dir, reason), ...]) in `save_dir`."""
    rejected = []
    for d in reversed(step_dirs(save_dir)):
        root = os.path.join(save_dir, d)
        if skip and os.path.abspath(root) == os.path.abspath(skip):
            continue
        try:
            verify_manifest(root, full)
            return root, rejected
        except IncompleteCheckpoint as e:
            rejected.append((root, str(e)))
    return None, rejected
