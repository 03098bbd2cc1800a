"""Offline data for calibration, distillation and evaluation: English text and small image sets.

Every source works without network access from files that exist on the machine (installed Python
sources, Debian data packages, your own files), and every failure is a one-line `DataError`.
"""

from replacer.data.images import (
    FASHION_MNIST_CLASSES,
    FASHION_MNIST_ROOT,
    IMAGENET_MEAN,
    IMAGENET_STD,
    IdxImageDataset,
    ImageFolderDataset,
    digits_dataset,
    read_idx,
)
from replacer.data.text import (
    SOURCE_PARTS,
    TEXT_SOURCES,
    bible_sentences,
    docstring_sentences,
    fortune_parts,
    fortune_sentences,
    hf_dataset_texts,
    is_prose,
    jsonl_texts,
    load_texts,
    prose_sentences,
    split_sentences,
    split_texts,
    text_file_lines,
    wordnet_sentences,
)
from replacer.errors import DataError

__all__ = [
    "FASHION_MNIST_CLASSES", "FASHION_MNIST_ROOT", "IMAGENET_MEAN", "IMAGENET_STD", "SOURCE_PARTS", "TEXT_SOURCES", "DataError",
    "bible_sentences", "fortune_parts", "prose_sentences",
    "IdxImageDataset", "ImageFolderDataset", "digits_dataset", "docstring_sentences", "fortune_sentences",
    "hf_dataset_texts", "is_prose", "jsonl_texts", "load_texts", "read_idx", "split_sentences", "split_texts",
    "text_file_lines", "wordnet_sentences",
]
