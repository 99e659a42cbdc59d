"""Known-bad combinations of the packages sdlora stands on, caught before they fail deep inside.

A fresh `pip install` can pair releases that refuse each other (transformers 5.24 demands a peft
that does not exist yet). The lock (requirements.lock) avoids that; this check turns the traceback
someone without the lock would get into one line naming the packages and the fix. It reads only
installed versions (importlib.metadata), so it costs nothing and imports none of them.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version

from packaging.version import Version

from sdlora.errors import SdloraError

FIX = "pip install -c requirements.lock -e . (the versions sdlora was tested with)"


class StackError(SdloraError, RuntimeError):
    """The installed packages are a combination known to fail; the message names them and the fix."""


@dataclass(frozen=True)
class Conflict:
    """`package` from `at_least` on needs `needs` at version `needs_at_least` or newer."""

    package: str
    at_least: str
    needs: str
    needs_at_least: str
    why: str

    def applies(self, versions: dict[str, Version | None]) -> bool:
        have, need = versions.get(self.package), versions.get(self.needs)
        return (
            have is not None
            and need is not None
            and have >= Version(self.at_least)
            and need < Version(self.needs_at_least)
        )


KNOWN_CONFLICTS = (
    Conflict(
        "transformers",
        "5.24",
        "peft",
        "0.22",
        "transformers refuses peft < 0.22 when loading a model ('The version of PEFT you are using "
        "is not compatible')",
    ),
)


def installed_versions(names: set[str]) -> dict[str, Version | None]:
    found: dict[str, Version | None] = {}
    for name in names:
        try:
            found[name] = Version(version(name))
        except PackageNotFoundError:
            found[name] = None
    return found


def stack_problems(versions: dict[str, Version | None] | None = None) -> list[str]:
    """One line per known conflict among the installed (or given) versions."""
    if versions is None:
        versions = installed_versions({n for c in KNOWN_CONFLICTS for n in (c.package, c.needs)})
    return [
        f"{c.package} {versions[c.package]} does not work with {c.needs} {versions[c.needs]}: {c.why}. "
        f"Fix: {FIX}, or pip install '{c.package}<{c.at_least}'."
        for c in KNOWN_CONFLICTS
        if c.applies(versions)
    ]


def check_stack() -> None:
    """Raise StackError naming the packages and the fix if the installed versions are known to fail."""
    problems = stack_problems()
    if problems:
        raise StackError(" ".join(problems))
