"""Exception hierarchy. Each error carries what the wire or the admin needs to hear."""

from __future__ import annotations

from dataclasses import dataclass


class ProxyError(Exception):
    """Root of every error the proxy raises on purpose."""


class RemotePDUError(ProxyError):
    """The peer broke PS3.8. Carries the A-ABORT source/reason to answer with."""

    def __init__(self, message: str, *, source: int = 2, reason: int = 6) -> None:
        super().__init__(message)
        self.source = source
        self.reason = reason


class SafeValueError(ValueError):
    """A ValueError whose message is known to hold no secret (so it may be shown to the admin)."""


class LocalPDUError(ProxyError):
    """We were asked to build something PS3.8 forbids (a bug or a config that cannot fit)."""


@dataclass(frozen=True)
class Location:
    path: str
    line: int  # 1-based
    col: int  # 1-based

    def __str__(self) -> str:
        return f"{self.path}:{self.line}:{self.col}"


class ConfigError(ProxyError):
    """An invalid config or rule file; str() is `path:line:col: error: message`."""

    def __init__(self, message: str, location: Location | None = None, source_line: str | None = None) -> None:
        self.message = message
        self.location = location
        self.source_line = source_line
        super().__init__(self.render())

    def render(self, with_caret: bool = False) -> str:
        head = f"{self.location}: error: {self.message}" if self.location else f"error: {self.message}"
        if with_caret and self.location is not None and self.source_line is not None:
            caret = " " * (self.location.col - 1) + "^"
            return f"{head}\n    {self.source_line}\n    {caret}"
        return head


class ConfigErrors(ProxyError):
    """Several ConfigErrors found in one pass, so an admin fixes them all at once."""

    def __init__(self, errors: list[ConfigError]) -> None:
        self.errors = errors
        super().__init__("\n".join(e.render() for e in errors))
