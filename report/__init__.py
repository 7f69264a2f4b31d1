"""The embedding analysis report of ``analysis.py``: how a run's embedding space is organised.

- :mod:`report.clustering`: k-means, agglomerative, DBSCAN and HDBSCAN against the classes (NMI,
  ARI, purity, silhouette);
- :mod:`report.maps`: 2-D maps (t-SNE; UMAP where ``umap-learn`` is installed);
- :mod:`report.per_class`: per-class Recall@1 and MAP@R and the nearest-neighbour confusion, from
  :mod:`retrieval.metrics` and :mod:`retrieval.search`;
- :mod:`report.baseline`: the untrained model's embeddings of the same images;
- :mod:`report.figures` and :mod:`report.page`: the PNG files and the HTML page;
- :mod:`report.build`: :func:`report.build.analyze` puts them together.

Everything here is NumPy, scikit-learn and matplotlib; only the baseline needs TensorFlow.
"""
