"""Hugging Face `transformers` interop: export a run (convert.py) and the code an export ships."""
