# Production-style image: the official Airflow image plus the cosell-sync provider.
# The image already ships what the CeleryExecutor deployment needs (the celery, postgres and redis
# providers, psycopg2 and redis-py; pyproject's "distributed" extra names the same packages), so
# only this provider and those of its requirements the image lacks (the Salesforce provider) are added.
FROM apache/airflow:3.3.2-python3.11
COPY --chown=airflow:root pyproject.toml README.md /opt/cosell-sync/
COPY --chown=airflow:root plugins /opt/cosell-sync/plugins
COPY --chown=airflow:root sandbox /opt/cosell-sync/sandbox
# "apache-airflow==${AIRFLOW_VERSION}" (the image's own version, set in its environment) keeps pip
# from moving Airflow; pip's default only-if-needed strategy leaves the image's packages alone
# when they satisfy our ranges and installs the missing ones. The checks after it fail the build if
# a package the deployment needs is missing (they import no Airflow module, which would write an
# airflow.cfg with generated secrets into the image).
RUN pip install --no-cache-dir "apache-airflow==${AIRFLOW_VERSION}" /opt/cosell-sync \
 && python -c "import importlib.metadata as m; [m.version(d) for d in ('cosell-sync', \
      'apache-airflow-providers-celery', 'apache-airflow-providers-salesforce')]" \
 && python -c "import msal, babel, psycopg2, redis"
