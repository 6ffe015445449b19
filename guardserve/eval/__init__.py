"""Evaluation suite: metrics, attack probes and reports."""
