"""Tooling around the service (it imports none of this): the demo and the embedded broker."""
