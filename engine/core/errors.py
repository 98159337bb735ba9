"""The one exception type the engine raises on purpose."""


class ConfigError(Exception):
    """Misconfiguration found before any work starts; the CLI prints it and exits with 2."""
