"""Caption engines: the interface (``base``), the backends by name (``registry``)."""
