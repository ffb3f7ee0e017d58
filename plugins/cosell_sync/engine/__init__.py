"""The sync engine: mapping, normalization and planning. Pure functions over pandas frames,
tested without Airflow; the DAGs only wire them to the hooks and the state store."""
