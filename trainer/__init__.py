"""Lean Diffusion-DPO trainer over precomputed latent shards."""
