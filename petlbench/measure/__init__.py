"""Measurement: memory (CUDA allocator, NVML, tensor tracker, RSS), speed, accuracy, environment."""
