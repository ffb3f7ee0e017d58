"""Provider metadata, found by Airflow through the ``apache_airflow_provider`` entry point.

The connection forms are declared here, once (``conn-fields``), so the Airflow UI shows
them without importing the hooks. Each form's Description field is relabeled to name the
connection id the DAGs read.
"""

from __future__ import annotations

from typing import Any

_S = {"type": ["string", "null"]}
_SECRET = {"type": ["string", "null"], "format": "password"}


def _field(label: str, schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"label": label, "schema": dict(schema), "description": description}


# The label of each form's Description field (in the "Standard Fields" section, open by default)
# names the connection id the DAGs read. Airflow 3.3 has no connection-type level help text, and
# a "description" placeholder does not reach the UI (ProvidersManager prefixes it as if it were an
# extra field), so the relabeling carries it; the UI reads it through /ui/connections/hook_meta.
PARTNER_CENTER_LABEL = "Description (the DAGs use the connection id partner_center_default)"
DYNAMICS365_LABEL = "Description (the DAGs use the connection id dynamics365_default)"

_MICROSOFT_COMMON = {
    "tenant_id": _field("Tenant ID", _S, "Entra ID tenant (directory) id of the app registration."),
    "authority": _field(
        "Authority",
        {**_S, "default": "https://login.microsoftonline.com"},
        "Entra ID authority host; the tenant id is appended.",
    ),
    "ca_bundle": _field("CA bundle", _S, "Optional path to a PEM CA bundle to trust (e.g. a TLS proxy)."),
}


def get_provider_info() -> dict[str, Any]:
    return {
        "package-name": "cosell-sync",
        "name": "cosell-sync",
        "description": "Microsoft Partner Center co-sell referrals <-> Dynamics 365 / Salesforce opportunities.",
        "integrations": [
            {
                "integration-name": "Microsoft Partner Center",
                "external-doc-url": "https://learn.microsoft.com/partner-center/developer/referrals-api-overview",
                "tags": ["service"],
            },
            {
                "integration-name": "Microsoft Dynamics 365 (Dataverse)",
                "external-doc-url": "https://learn.microsoft.com/power-apps/developer/data-platform/webapi/overview",
                "tags": ["service"],
            },
            {
                "integration-name": "Salesforce (cosell-sync)",
                "external-doc-url": "https://developer.salesforce.com/docs/atlas.en-us.api_rest.meta/api_rest/",
                "tags": ["service"],
            },
        ],
        "hooks": [
            {"integration-name": "Microsoft Partner Center", "python-modules": ["cosell_sync.hooks.partner_center"]},
            {
                "integration-name": "Microsoft Dynamics 365 (Dataverse)",
                "python-modules": ["cosell_sync.hooks.dynamics365"],
            },
            # Extends the Salesforce provider's hook; the "salesforce" connection type stays the provider's.
            {"integration-name": "Salesforce (cosell-sync)", "python-modules": ["cosell_sync.hooks.salesforce"]},
        ],
        "operators": [
            {
                "integration-name": "Microsoft Partner Center",
                "python-modules": ["cosell_sync.operators.webhook_registration"],
            },
        ],
        "connection-types": [
            {
                "connection-type": "partner_center",
                "hook-class-name": "cosell_sync.hooks.partner_center.PartnerCenterHook",
                "hook-name": "Microsoft Partner Center",
                "conn-fields": {
                    **_MICROSOFT_COMMON,
                    "referrals_url": _field(
                        "Referrals API URL",
                        {**_S, "default": "https://api.partner.microsoft.com/v1.0/engagements/referrals"},
                        "Base URL of the Referrals API.",
                    ),
                    "webhooks_url": _field(
                        "Webhooks API URL",
                        {**_S, "default": "https://api.partnercenter.microsoft.com/webhooks/v1"},
                        "Base URL of the webhook registration API.",
                    ),
                    "refresh_token": _field(
                        "Refresh token",
                        _SECRET,
                        "App+user refresh token (Partner Center needs an app+user token). Rotated tokens are "
                        "persisted under $AIRFLOW_HOME/cosell.",
                    ),
                    "username": _field("Service account user", _S, "Alternative to the refresh token."),
                    "user_password": _field("Service account password", _SECRET, "Password of that user."),
                },
                "ui-field-behaviour": {
                    "hidden-fields": ["host", "schema", "port", "extra"],
                    "relabeling": {
                        "login": "Client ID",
                        "password": "Client secret",
                        "description": PARTNER_CENTER_LABEL,
                    },
                    "placeholders": {"login": "00000000-0000-0000-0000-000000000000"},
                },
            },
            {
                "connection-type": "dynamics365",
                "hook-class-name": "cosell_sync.hooks.dynamics365.DynamicsHook",
                "hook-name": "Microsoft Dynamics 365 (Dataverse)",
                "conn-fields": dict(_MICROSOFT_COMMON),
                "ui-field-behaviour": {
                    "hidden-fields": ["schema", "port", "extra"],
                    "relabeling": {
                        "host": "Environment URL",
                        "login": "Client ID",
                        "password": "Client secret",
                        "description": DYNAMICS365_LABEL,
                    },
                    "placeholders": {"host": "https://contoso.crm.dynamics.com"},
                },
            },
        ],
    }
