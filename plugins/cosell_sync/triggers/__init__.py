"""Triggers shipped with the provider."""
