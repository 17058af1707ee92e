"""kalmkg: make a language model know a knowledge graph."""

__version__ = "0.1.0"
