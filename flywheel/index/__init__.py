"""Nearest-neighbour search over the pool's embeddings (FAISS): one index type, flat or sharded on disk."""
