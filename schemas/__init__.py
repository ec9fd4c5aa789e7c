"""The contract between the encode stages and the trainer: files on disk and the configs that make them."""
