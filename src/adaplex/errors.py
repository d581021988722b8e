"""User-facing errors. The CLI prints their message on one line and exits non-zero."""


class AdaplexError(Exception):
    """Base class for every error a user can cause; the message says what to do."""


class ConfigError(AdaplexError):
    """A bad method name, unknown field or wrong value in a config."""


class TargetError(AdaplexError):
    """A target pattern that matches nothing, or a model family adaplex cannot adapt."""


class AdapterNameError(AdaplexError):
    """An unknown, duplicate or wrongly-used adapter name."""


class ModelNotFoundError(AdaplexError):
    """A base model that cannot be found where it was looked for."""


class StorageError(AdaplexError):
    """A missing, corrupt or mismatched adapter file, or a refused overwrite."""
