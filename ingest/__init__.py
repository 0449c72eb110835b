"""Turning user text into clean, deduplicated documents and training examples."""
