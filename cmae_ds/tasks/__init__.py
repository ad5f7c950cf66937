"""The tasks the loop runs: pretraining, fine-tuning and probing, evaluation, kNN, the benchmark."""
