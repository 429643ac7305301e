"""Image sources -> an ordered dataset, held as columns (relative paths or locators, labels, split codes).

Understood, by :func:`load_dataset`:

* a folder tree with one sub-folder per class (ImageFolder), optionally with ``train/``, ``val/``
  and ``test/`` folders on top, or a plain folder of unlabelled images (:mod:`.folder`);
* a CSV or Parquet manifest with columns ``path[,label][,split]``, paths relative to it or URLs,
  or a Parquet file with an ``image`` column of bytes (:mod:`.manifest`);
* WebDataset ``.tar`` shards: a path, a glob or a brace pattern ``data-{000000..000099}.tar`` (:mod:`.tar`);
* a Hugging Face dataset written by ``save_to_disk`` (:mod:`.hf`, needs the ``datasets`` extra);
* any of the files above behind an fsspec URL (:mod:`.remote`).

Records are sorted by path so the order never depends on the file system. When labelled images
come with no split, a deterministic stratified split is made from a seed (see :func:`stratified_split`).
Items that are not plain files are read through a :class:`Reader` (:mod:`.items`).
"""

from .items import ItemColumn, Reader
from .load import load_dataset
from .records import IMAGE_EXTENSIONS, SPLITS, UNLABELLED, Dataset, PathColumn, Record, stratified_split

__all__ = ["IMAGE_EXTENSIONS", "SPLITS", "UNLABELLED", "Dataset", "ItemColumn", "PathColumn", "Reader", "Record", "load_dataset",
           "stratified_split"]
