"""Broker I/O: the Kafka client, record and header codecs, and topic readers."""
