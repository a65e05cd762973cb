"""Evaluation protocols: weighted k-NN, linear probe, attention maps."""
