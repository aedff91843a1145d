"""Typed errors (each names what was wrong and what is allowed) and hetero's one warning category."""


class HeteroError(Exception):
    """Base class of every error hetero raises on purpose."""


class ShapeError(HeteroError, ValueError):
    """A tensor has the wrong rank or a dimension that does not match its partners."""


class DTypeError(HeteroError, TypeError):
    """A tensor has a dtype hetero does not accept here, or dtypes that must agree do not."""


class InvalidValueError(HeteroError, ValueError):
    """A value is out of its allowed range (NaN/inf where finite is required, index out of range, ...)."""


class ConfigError(HeteroError, ValueError):
    """A configuration field holds a value that is not allowed."""


class BackendUnavailableError(HeteroError, RuntimeError):
    """No backend supports the request; the message lists every backend's reasons."""


class IndexSyncError(HeteroError, RuntimeError):
    """A retriever's index fell behind its host tier (an add failed); it was rebuilt from the tier."""


class ClosedError(HeteroError, RuntimeError):
    """The object (a cache, a runtime) was closed; nothing was changed."""


class StalePlanError(HeteroError, RuntimeError):
    """A step plan was used after the cache's geometry or lengths changed: plan again."""


class UnsupportedError(HeteroError, ValueError):
    """A feature hetero does not implement was asked for; the message names it and what to do instead."""


class PerformanceWarning(UserWarning):
    """Something makes hetero run slower than it could, and what to do about it."""
