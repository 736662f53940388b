"""Exceptions raised by clr_timm.

Every error the library raises derives from :class:`CLRError`, so ``except clr_timm.CLRError`` catches all of them.
Problems with an adapter (its file, keys, shapes, metadata or base model) raise :class:`AdapterError` or one of its
subclasses; problems pushing to or pulling from the Hugging Face Hub raise :class:`HubError` (an :class:`AdapterError`)
or one of its subclasses.

Values that come from files, repos or users reach messages through :func:`shown` (and the terminal or a model card
through :func:`printable`): cut to a bounded length, with control characters escaped, so a hostile name can neither
flood stderr nor rewrite the screen.
"""

__all__ = [
    "CLRError",
    "ConfigError",
    "AdapterError",
    "AdapterMismatchError",
    "BackboneMismatchError",
    "HubError",
    "HubRepoNotFoundError",
    "HubAuthError",
    "HubRevisionNotFoundError",
    "TaskNotFoundError",
    "HubOfflineError",
    "RequestError",
    "shown",
    "printable",
]

MAX_SHOWN = 200
"""How many characters of a value a message quotes."""


def shown(value: object, limit: int = MAX_SHOWN) -> str:
    """``repr(value)`` cut to ``limit`` characters: how a message quotes a name or value it did not choose."""
    try:
        text = repr(value)
    except Exception:  # nested deeper than repr recurses (RecursionError), or a repr that fails
        return f"<a {type(value).__name__} that cannot be shown>"
    return text if len(text) <= limit else f"{text[:limit]}... (cut, {len(text)} characters)"


def printable(text: str, limit: int = MAX_SHOWN) -> str:
    """``text`` for a terminal or a card: every non-printable character escaped as ``repr`` writes it, cut to ``limit``.

    Printable text, including quotes and non-ASCII letters, is kept as it is.
    """
    escaped = "".join(c if c.isprintable() else repr(c)[1:-1] for c in text[:limit])
    if len(text) <= limit and len(escaped) <= limit:
        return escaped
    return f"{escaped[:limit]}... (cut, {len(text)} characters)"


class CLRError(Exception):
    """Base class of every error raised by clr_timm."""


class ConfigError(CLRError, ValueError):
    """A :class:`~clr_timm.CLRConfig` is invalid (unknown field, bad value, JSON that does not parse)."""


class AdapterError(CLRError):
    """An adapter cannot be read, written or applied (file, keys, shapes, metadata)."""


class AdapterMismatchError(AdapterError):
    """An adapter does not fit the model it is loaded into (architecture, keys, shapes, config)."""


class BackboneMismatchError(AdapterMismatchError):
    """An adapter was trained on other backbone weights than those of the model it is loaded into."""


class HubError(AdapterError):
    """An adapter cannot be pushed to or pulled from the Hugging Face Hub."""


class HubRepoNotFoundError(HubError):
    """The repo does not exist, or it is private and the token given cannot read it."""


class HubAuthError(HubError):
    """The Hub needs a (valid) token, or the token may not write where the push goes.

    Also raised for a repo that cannot be read without a token: the Hub answers the same for a private repo as for a
    missing one, so the message names both.
    """


class HubRevisionNotFoundError(HubError):
    """The branch, tag or commit does not exist in the repo."""


class TaskNotFoundError(HubError):
    """The repo has no adapter for the task at that revision; the message lists the tasks it has."""


class HubOfflineError(HubError):
    """The Hub cannot be reached (or offline mode is on) and what was asked for is not in the local cache."""


class RequestError(CLRError):
    """A request the HTTP server (:mod:`clr_timm.serve`) refuses: ``status`` is the HTTP status, ``code`` a short
    machine-readable name, and the message names the problem."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
