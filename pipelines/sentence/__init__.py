"""Sentence embeddings: distil the real all-MiniLM-L6-v2 into a small BERT through kdcache, offline."""
