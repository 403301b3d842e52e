"""The package's version (a leaf: the package's ``__init__`` and a Flower node's warm worker read it)."""

__version__ = "0.1.0"
