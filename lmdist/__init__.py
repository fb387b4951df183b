"""lmdist: the lesson's language-model training loop on HuggingFace Accelerate, from one CPU to a cluster."""
__version__ = "0.1.0"
