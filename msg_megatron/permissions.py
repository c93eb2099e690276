"""Files and folders the tools write get the mode a plain open()/mkdir() would give them.

safetensors writes its files 0600 and `tempfile.mkdtemp` makes folders 0700, so an export or a
prepared dataset on a shared cluster filesystem would be unreadable by the user's group although
their umask (typically 022 or 002) says otherwise. `honour_umask` sets 0666 / 0777 less the umask.
"""
from __future__ import annotations

import os


def current_umask() -> int:
    try:  # Linux >= 4.7 reports it without changing it
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def honour_umask(path: str) -> None:
    """chmod `path` (a file or a folder) to what the umask would have given it."""
    base = 0o777 if os.path.isdir(path) else 0o666
    os.chmod(path, base & ~current_umask())
