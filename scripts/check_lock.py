"""Compare the installed distributions with a lock file, so that `make install` fails when they differ.

A fresh clone's environment must hold exactly the lock's packages at the lock's versions (local labels
such as ``+cpu`` included); the project itself is the one package outside the lock.
"""

from __future__ import annotations

import argparse
import sys
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

PROJECT = "taskmoe"


def read_lock(path: Path) -> dict[str, str]:
    """Each pinned package of a pip-compile lock, by canonical name, with its exact version."""
    pins: dict[str, str] = {}
    for number, raw in enumerate(path.read_text().splitlines(), start=1):
        line = raw.split(" #", 1)[0].strip()
        if not line or line.startswith(("#", "-")):
            continue
        requirement = Requirement(line)
        specifiers = list(requirement.specifier)
        if len(specifiers) != 1 or specifiers[0].operator != "==":
            raise ValueError(f"{path}:{number}: {line!r} is not pinned with one '=='")
        pins[canonicalize_name(requirement.name)] = specifiers[0].version
    return pins


def installed_versions(exclude: frozenset[str] = frozenset({PROJECT})) -> dict[str, str]:
    """Every distribution of the running interpreter's environment, by canonical name."""
    found: dict[str, str] = {}
    for distribution in metadata.distributions():
        name = canonicalize_name(distribution.metadata["Name"])
        if name not in exclude:
            found[name] = distribution.version
    return found


def differences(locked: dict[str, str], installed: dict[str, str]) -> list[str]:
    """What an install would have to change to match the lock, one line per package."""
    lines = []
    for name in sorted(locked.keys() | installed.keys()):
        want, have = locked.get(name), installed.get(name)
        if want is None:
            lines.append(f"{name}=={have} is installed but not in the lock")
        elif have is None:
            lines.append(f"{name}=={want} is in the lock but not installed")
        elif want != have:
            lines.append(f"{name}: the lock has {want}, {have} is installed")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("lock", type=Path, help="a lock written by `make lock` (requirements/cpu.txt)")
    args = parser.parse_args(argv)
    found = differences(read_lock(args.lock), installed_versions())
    if found:
        print(f"{sys.prefix} differs from {args.lock}:", *found, sep="\n  ", file=sys.stderr)
        print("Run `make clean install` for a fresh environment from the lock.", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
