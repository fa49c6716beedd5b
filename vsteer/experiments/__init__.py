"""Experiments that test the value-path claim; each returns an :class:`ExperimentResult`."""

from vsteer.experiments.result import ExperimentResult, records_to_markdown

__all__ = ["ExperimentResult", "records_to_markdown"]
