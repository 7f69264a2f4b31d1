"""Retrieval: from a gallery of embeddings to numbers and pictures. Pure NumPy (no TensorFlow), so
the evaluation CLIs start fast.

- :mod:`retrieval.search`: scores (cosine / negative Euclidean), deterministic ranking (ties to the
  lower gallery index), :class:`~retrieval.search.ExactIndex` top-k search in memory-bounded blocks.
- :mod:`retrieval.metrics`: mAP (of AP@r), Precision@1, Recall@k, MAP@R, R-precision, NMI, for the
  protocols train_gallery, leave_one_out and query_gallery.
- :mod:`retrieval.gallery`: the HDF5 gallery (atomic writes, identity checks, resumable writer).
- :mod:`retrieval.faiss_index`: optional approximate search with FAISS (faiss-cpu).
- :mod:`retrieval.visualize`: a query beside its answers, framed by match / miss.
- :mod:`retrieval.searcher`: the :class:`~retrieval.searcher.Searcher` that cbir.py, test.py and
  serve.py share: a run's model, gallery and index loaded once, answering batches of queries
  (it loads the model through :mod:`retrieval.embedder`, the one module here using TensorFlow).

Definitions: docs/retrieval.md.
"""
