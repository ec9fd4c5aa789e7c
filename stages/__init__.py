"""Offline encode: Pick-a-Pic parquet → winner-first latent and caption-embedding WebDataset shards (Ray Data)."""
