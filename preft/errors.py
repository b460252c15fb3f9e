"""Errors that name what is wrong and what would be right.

Every error preft raises on bad input derives from ``PreftError`` so a server can turn any of
them into a 400 without catching programming errors by accident.
"""


class PreftError(ValueError):
    """Bad input given to preft (a file, a config, a request)."""


class AdapterFormatError(PreftError):
    """An adapter directory is missing files, has unknown keys or malformed config."""


class AdapterShapeError(PreftError):
    """An adapter tensor has a shape that does not fit its config or the base model."""


class BaseModelMismatchError(PreftError):
    """An adapter was trained on a base model that differs from the one it is loaded into."""


class UnknownTargetModuleError(PreftError):
    """A LoRA target module name matches no linear layer of the base model."""


class NonFiniteWeightsError(PreftError):
    """An adapter tensor holds NaN or inf."""


class UnsupportedModelError(PreftError):
    """A base-model architecture preft does not implement."""
