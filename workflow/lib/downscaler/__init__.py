"""Climate downscaling with Reslim vision transformers and TILES: every stage's logic."""

__version__ = "0.1.0"
