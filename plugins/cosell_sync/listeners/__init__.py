"""Airflow listeners shipped with the provider (registered by :mod:`cosell_sync.plugin`)."""
