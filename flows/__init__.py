"""Orchestration and the command line: the Prefect flow and the `farcast` command."""
