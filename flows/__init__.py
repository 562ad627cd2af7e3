"""Orchestration and the command line: Prefect flows (issue 5) and the `farcast` command."""
