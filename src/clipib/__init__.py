"""clipib: information-bottleneck attribution for CLIP-style vision-language models."""
__version__ = "0.1.0"
