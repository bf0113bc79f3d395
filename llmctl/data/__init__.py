"""What `llmctl prepare` is made of, for every task: corpus and labelled-file readers, conversations and
chat templates, tokenizer training, user text encoded as text, flat token shards, and the dataset-dir
skeleton (dataset_builder, dataset_reader) that each task's data module (llmctl.tasks.<task>.data) calls.

Submodules import `tokenizers` and `numpy`; this package module imports nothing heavy.
"""
