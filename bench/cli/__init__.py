"""The `bench` command line: one subcommand per module."""
