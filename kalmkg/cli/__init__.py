"""The command line: `kalmkg` and its commands."""
