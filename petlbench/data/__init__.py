"""Datasets: the suite's data specs (torch-free), list files and image folders, the hub cache, and the loaders."""
