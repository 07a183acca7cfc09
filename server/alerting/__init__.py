"""Alerting: the rule format and the default rules, the alert engine, the Alertmanager
notifier."""
