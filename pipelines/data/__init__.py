"""The data path's shared parts: the schema (column names, metadata keys, format versions), input
sources, resumable sharded Parquet output, and rows -> model tensors. Builds on ``pipelines.common``."""
