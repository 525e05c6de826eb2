"""zeroconv's jobs. ``common/`` and ``data/`` are the foundation; every other module is a stage
(annotate, precompute, train, evaluate, promote, pipeline, submit, demo) or the CLI over them."""
