"""The foundation every package builds on: configs, storage, images, Ray, MLflow tracking, dtypes.

It imports nothing of the project above it (checked by ``lint-imports``): stages, ``model/``,
``annotators/`` and ``deploy/`` may all use it.
"""
