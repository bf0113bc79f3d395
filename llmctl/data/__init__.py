"""Corpus readers, tokenizer training and flat token shards: what `llmctl prepare` is made of.

Submodules import `tokenizers` and `numpy`; this package module imports nothing heavy.
"""
