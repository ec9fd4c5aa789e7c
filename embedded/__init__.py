"""The embedded default: synthetic Pick-a-Pic data, tiny diffusers models and small encode outputs, built offline."""
