# Production-style image: the official Airflow image plus the cosell-sync provider.
FROM apache/airflow:3.3.2-python3.11
COPY --chown=airflow:root pyproject.toml README.md /opt/cosell-sync/
COPY --chown=airflow:root plugins /opt/cosell-sync/plugins
COPY --chown=airflow:root sandbox /opt/cosell-sync/sandbox
RUN pip install --no-cache-dir "msal>=1.31,<2" \
 && pip install --no-cache-dir --no-deps /opt/cosell-sync
