"""Speed and memory measurements: ratios against non-private training in the same run."""
