"""nblib: the helper library behind the machado-gpt notebooks.

Layering (lower never imports higher): files, config, tokenizer, sampling -> ingest, clean,
dialogue, data -> model, generate -> train, finetune -> report -> faces (pipeline, chat).
"""
__version__ = "0.1.0"
