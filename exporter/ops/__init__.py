"""Operator tooling: rule, dashboard and Alertmanager generation, the PNG report. Never imported by the
training side."""
