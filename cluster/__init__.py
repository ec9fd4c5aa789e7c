"""What the encode (stages/) and the evaluation (evaluation/) share about running on Ray."""
