"""Predicting a run's memory without running it: the fake-tensor engine (a torch child), its torch-free client,
the batch-size search and the CPU plan guard."""
