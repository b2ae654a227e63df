"""Observability: Prometheus metrics and the HTTP endpoint, logging, the Grafana dashboard spec."""
