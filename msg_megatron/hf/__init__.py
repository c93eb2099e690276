"""Hugging Face `transformers` export (msg-export-hf) and import (msg-import-hf)."""
