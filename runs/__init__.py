"""A run: its folder and every path in it (:mod:`runs.folder`), its checkpoints
(:mod:`runs.checkpoint`) and which weights it is used with (:mod:`runs.weights`).

The run layer sits below training and the retrieval services: both ask it for a run's paths and
weights, and nobody rebuilds them by hand.
"""
