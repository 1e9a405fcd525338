"""Embeddings: the backbones, the pipeline that feeds them, the store of vectors, and the body in use."""
