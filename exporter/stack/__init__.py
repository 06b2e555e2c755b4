"""The local stack and demo: Prometheus, Alertmanager and Pushgateway on loopback, demo training runs."""
