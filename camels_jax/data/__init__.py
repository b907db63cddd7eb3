"""Data: TFDS-built QA datasets (generated default, SQuAD, StreamingQA, ArchivalQA), CaMeLS splits, batches.

Entry point: `load(get_data_config(), tokenizer, workdir)` returns a `Data` whose loaders yield fixed-shape
numpy batches (see `pipeline` for array names and masks).
"""

from camels_jax.data.config import DATASETS, get_data_config
from camels_jax.data.dataset import Data, check_sources, load
from camels_jax.data.sources import DataError

__all__ = ["DATASETS", "Data", "DataError", "check_sources", "get_data_config", "load"]
