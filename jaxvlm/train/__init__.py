"""Training: the vision data collator and the readers of training records."""
from jaxvlm.train.collator import UnslothVisionDataCollator, VisionDataCollator, bucket_size, bucket_sizes
from jaxvlm.train.data import DataError, load_jsonl, load_records

__all__ = ["DataError", "UnslothVisionDataCollator", "VisionDataCollator", "bucket_size", "bucket_sizes",
           "load_jsonl", "load_records"]
