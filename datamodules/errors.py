"""One exception type for bad data, so the CLI can print it as one clear line and exit non-zero."""


class DataError(ValueError):
    """Raised for missing files, unknown languages, malformed lines or labels outside a task's set.

    Messages name the file (and line or key), what was expected and what was found.
    """
