"""The suite vocabulary, torch-free: the suite and run models, YAML loading, messages, expansion and the
controlled variables."""
