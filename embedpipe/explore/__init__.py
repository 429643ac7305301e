"""Put cached embeddings to work beyond a classifier: neighbours, a duplicates/leakage/label audit, a map, exports.

- :func:`neighbors`: exact cosine top-k within an exported file, or for new images (through the cache)
- :func:`search`: the same search on plain arrays (:mod:`.knn`)
- :func:`audit`: duplicates, leakage across splits, label issues, outliers; audit.json + audit.html (:mod:`.audit`)
- :func:`map_embeddings`: a 2-D projection (PCA, or UMAP); map.png + map.html (:mod:`.map`)
- :func:`retrieval_quality`, :func:`split_leakage`: recall@k and mAP@R of one split against another, and
  duplicates across them (:mod:`.retrieval`, :mod:`.leakage`; the bench reports both per backbone)
- :func:`export`: Parquet, NumPy + JSON, a FAISS index, a Lance table (:mod:`.export`)

Every function reads an exported file through :func:`embedpipe.load`; torch and the optional
extras (pyarrow, faiss, lance, cleanlab, umap) are imported when a function needs them.
"""

from __future__ import annotations

from .audit import DUPLICATE_THRESHOLD, AuditResult, audit
from .export import FORMATS, Exported, export, read_metadata
from .knn import Search, normalize, search
from .leakage import Leakage, split_leakage
from .map import METHODS, MapResult, map_embeddings, project
from .neighbors import COLUMNS, Neighbors, faiss_search, neighbors
from .retrieval import RECALL_AT, Retrieval, retrieval_quality

__all__ = ["COLUMNS", "DUPLICATE_THRESHOLD", "AuditResult", "audit", "FORMATS", "Exported", "Leakage", "METHODS", "RECALL_AT", "Retrieval", "MapResult", "Neighbors", "Search", "export", "faiss_search", "map_embeddings", "neighbors", "normalize", "project", "read_metadata", "retrieval_quality", "search", "split_leakage"]
