"""One module per pipeline stage, each a plain function behind a thin CLI command."""
