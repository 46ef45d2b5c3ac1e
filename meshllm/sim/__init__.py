"""Discrete-event serving simulator. Pure."""
