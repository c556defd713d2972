"""Tools built on the core: evaluation (top-1 over r), benchmark (throughput), the latency controller,
token-group visualisation, bank scale tuning and conversion of the official checkpoint."""
