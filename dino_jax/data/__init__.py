"""Data: random-access sources, the grain host pipeline, on-device crops."""
