"""Images on disk -> arrays: the data layer of tfcbir.

- :mod:`datasets.images`: decode one file into upright RGB uint8 (``load_image``), crops.
- :mod:`datasets.image_list`: ``ImageList`` (paths, labels, classes) and the list-file readers.
- :mod:`datasets.lists`: a data root's image lists and train/test splits (``load_splits``).
- :mod:`datasets.archives`: the CUB-200-2011, Cars196, SOP and In-shop archives as distributed,
  split by their papers' protocol.
- :mod:`datasets.sampler`: P x K batch indices, a pure function of (seed, step).
- :mod:`datasets.augment`: training-time augmentation (``Augmentation``: resized crops, colour
  jitter, grayscale, RandAugment; the ``data.augment`` presets), drawn from seeded generators.
- :mod:`datasets.pipeline`: training batches (``TrainData``) and evaluation batches
  (``iter_eval_batches``), decoded in thread pools; ``find_unreadable`` for checks.
- :mod:`datasets.demo`: a small seeded data set of shapes (``python -m datasets.demo``).

This layer takes plain arguments (paths, dicts, numbers): it never imports ``config``, ``nets``,
``losses``, ``training`` or the command-line scripts. Only ``TrainData.dataset`` needs TensorFlow.
"""
