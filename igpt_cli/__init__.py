"""igpt: Image GPT as an unsupervised feature extractor, from a shell."""
__version__ = "0.1.0"
