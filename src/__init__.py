"""The spine: configuration, per-dataset modules, privacy setup, the training loop and run tracking."""
