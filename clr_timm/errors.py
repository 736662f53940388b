"""Exceptions raised by clr_timm.

Every error the library raises derives from :class:`CLRError`, so ``except clr_timm.CLRError`` catches all of them.
Problems with an adapter (its file, keys, shapes, metadata or base model) raise :class:`AdapterError` or one of its
subclasses.
"""

__all__ = ["CLRError", "ConfigError", "AdapterError", "AdapterMismatchError", "BackboneMismatchError"]


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
