"""Data input: document sources, tokenizers and the packed, resumable grain pipeline."""

from jaxtrain.data.pipeline import make_dataset, sample_ids
from jaxtrain.data.sources import DataError, list_files
from jaxtrain.data.tokenizer import Tokenizer, load_tokenizer

__all__ = ['DataError', 'Tokenizer', 'list_files', 'load_tokenizer', 'make_dataset', 'sample_ids']
