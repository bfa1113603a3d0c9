"""The "measured" stamp every benchmark result file carries: the commit and the time it was measured at.

    from _measured import measured      # in a script of scripts/ (its directory is on sys.path)
    report["measured"] = measured()

The docs renderer (`scripts/render_docs.py`) shows the stamp under every table it renders from the file, so a
reader sees how old a number is and which code produced it.
"""

from __future__ import annotations

import datetime
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _git(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()


def measured() -> dict[str, str]:
    """{"commit": HEAD, with "+dirty" when tracked files differ from it (as `git describe --dirty`), "date": UTC
    ISO date-time}. Result files (`bench/results/`) do not count: a benchmark running beside another in one
    checkout sees the other's output, not other code. Without git (an unpacked copy), the commit is "unknown"
    rather than a guess."""
    try:
        commit = _git("rev-parse", "HEAD")
        if _git("status", "--porcelain", "--untracked-files=no", "--", ".", ":(exclude)bench/results"):
            commit += "+dirty"
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    date = datetime.datetime.now(datetime.UTC).replace(microsecond=0).isoformat()
    return {"commit": commit, "date": date}


# Reading a stamp (scripts/render_docs.py and the tables it renders).

ROUTING_REWRITE = {"commit": "6630b25aaeab83bac1f3c04dd63833eeb462eee7", "date": "2026-11-29T20:09:23+00:00"}
"""The routing rewrite (calibrated probabilities, unions, the out-of-store check): a routed figure measured before
it describes the router that came before. `tests/test_docs.py` checks the date test below against git's ancestry."""


def _date(stamp: dict[str, str]) -> datetime.datetime:
    return datetime.datetime.fromisoformat(stamp["date"]).astimezone(datetime.UTC)


def predates(stamp: dict[str, str], commit: dict[str, str] = ROUTING_REWRITE) -> bool:
    """Whether the measurement was taken before `commit`: by date, so that rendering needs no git history (a
    shallow clone renders the same page); on main's linear history that is git's ancestry."""
    return stamp["commit"].removesuffix("+dirty") != commit["commit"] and _date(stamp) < _date(commit)


def describe(stamp: dict[str, str]) -> str:
    """ "measured at `<commit[:10]>` on <date>", saying where an older file's stamp came from."""
    commit = stamp["commit"]
    short = commit[:10] + ("+dirty" if commit.endswith("+dirty") else "")
    text = f"measured at `{short}` on {_date(stamp).date().isoformat()}"
    if "from" in stamp:
        text += " (the commit that recorded it)"
    if "only" in stamp:  # a run of part of a benchmark: the rest of the file is the earlier run's
        rows = f" (rows {'; '.join(stamp['recipes'])})" if stamp.get("recipes") else ""
        text += f" for {stamp['only']}{rows}" + (f", the rest {describe(stamp['rest'])}" if stamp.get("rest") else "")
    return text
