"""Tools beside the training path: the data benchmarks and the embedded-set maker."""
