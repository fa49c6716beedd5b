"""Exceptions. Each is raised where bad input enters, with one line naming the value and what was expected."""


class VsteerError(ValueError):
    """Base class for vsteer's input errors."""


class ModelError(VsteerError):
    """Unknown model, unsupported architecture, unreadable model file."""


class SiteError(VsteerError):
    """Unknown site, layer or head out of range, shape mismatch at a site."""


class RecipeError(VsteerError):
    """Malformed or invalid YAML recipe."""


class VectorError(VsteerError):
    """Steering vector from another model, size or site; NaN values; unreadable file."""


class DataError(VsteerError):
    """Unknown dataset name, missing fields, empty or misaligned data."""
