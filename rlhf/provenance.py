"""What a manifest says about the software that made it: package versions and the git commit of this checkout."""

from __future__ import annotations

import platform
import subprocess
from importlib import metadata
from pathlib import Path


def versions(packages: tuple[str, ...]) -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in packages:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return out


def git_commit() -> str | None:
    """The commit of the rlhf-pipeline checkout in use (None for an installed wheel or a dirty-less tarball)."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent, capture_output=True,
                             text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None
