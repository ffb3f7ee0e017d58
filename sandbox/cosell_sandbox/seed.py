"""Realistic, reproducible sandbox data (seeded RNG; no external data sets)."""

from __future__ import annotations

import random
import unicodedata
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

COMPANIES = [
    ("Contoso Pharmaceuticals", "US", "98052", "Redmond", "WA", "One Microsoft Way"),
    ("Fabrikam Manufacturing", "US", "10017", "New York", "NY", "405 Lexington Ave"),
    ("Northwind Traders", "GB", "EC2A 4NE", "London", "", "1 Finsbury Avenue"),
    ("Adventure Works Cycles", "CA", "M5H 2N2", "Toronto", "ON", "200 Bay Street"),
    ("Tailspin Toys", "AU", "2000", "Sydney", "NSW", "1 Macquarie Place"),
    ("Wide World Importers", "NL", "1012 AB", "Amsterdam", "", "Damrak 1"),
    ("Müller Präzisionstechnik GmbH", "DE", "80331", "München", "BY", "Marienplatz 8"),
    ("Société Générale des Eaux", "FR", "75008", "Paris", "", "12 Rue d'Anjou"),
    ("O'Brien & Daughters Ltd", "IE", "D02 X285", "Dublin", "", "7 Grafton Street"),
    ("Woodgrove Bank", "US", "60601", "Chicago", "IL", "233 S Wacker Dr"),
    ("Litware, Inc.", "US", "94105", "San Francisco", "CA", "415 Mission St"),
    ("Proseware (Pty) Ltd", "ZA", "8001", "Cape Town", "WC", "2 Long Street"),
    ("Lamna Healthcare", "US", "02110", "Boston", "MA", "100 Federal St"),
    ("Trey Research", "JP", "100-0005", "Tokyo", "", "1-1 Marunouchi"),
    ("Alpine Ski House", "CH", "8001", "Zürich", "ZH", "Bahnhofstrasse 10"),
    ("Coho Winery", "US", "97204", "Portland", "OR", "1120 NW Couch St"),
    ("Datum Corporation", "SG", "018989", "Singapore", "", "10 Marina Blvd"),
    ("Relecloud", "IN", "560001", "Bengaluru", "KA", "MG Road 42"),
    ("Bellows College", "US", "30303", "Atlanta", "GA", "55 Park Place"),
    ("Graphic Design Institute", "BR", "01310-100", "São Paulo", "SP", "Av. Paulista 1000"),
]
FIRST = ["Avery", "Jordan", "Mei", "Lars", "Priya", "Chloé", "Seán", "Kenji", "Amara", "Diego", "Zoë", "Noah"]
LAST = ["Smith", "Nakamura", "Okafor", "Johansson", "Patel", "Dubois", "O'Neill", "García", "Müller", "Chen"]
CURRENCY = {
    "US": "USD",
    "GB": "GBP",
    "CA": "CAD",
    "AU": "AUD",
    "NL": "EUR",
    "DE": "EUR",
    "FR": "EUR",
    "IE": "EUR",
    "ZA": "ZAR",
    "JP": "JPY",
    "CH": "CHF",
    "SG": "SGD",
    "IN": "INR",
    "BR": "BRL",
}
SOLUTIONS = [
    ("SOL-6115380-IPC", "Contoso Cloud Migration Factory"),
    ("SOL-7204417-ABC", "Fabrikam Secure Workplace"),
    ("SOL-5519027-XYZ", "Data Estate Modernization on Azure"),
    ("SOL-8830012-DEF", "Copilot Readiness Accelerator"),
]
HELP_CODES = [
    "GeneralOrOther",
    "CustomerTechnicalArchitecture",
    "ProofOfConceptOrDemo",
    "QuotesOrLicensing",
    "PostSalesCustomerSuccess",
    "WorkloadSpecificValueProposition",
]
DEAL_NAMES = [
    "Azure migration",
    "Modern Work rollout",
    "Security modernization",
    "Data platform",
    "AI pilot",
    "Dynamics 365 Sales",
    "SAP on Azure",
    "Copilot adoption",
]
# (status, substatus, weight)
STATUS_MIX = [
    ("New", "Pending", 30),
    ("New", "Received", 10),
    ("Active", "Accepted", 35),
    ("Closed", "Won", 12),
    ("Closed", "Lost", 6),
    ("Closed", "Declined", 4),
    ("Closed", "Expired", 3),
]


def iso(ts: datetime) -> str:
    """Partner Center style timestamp: 7 fractional digits and Z."""
    return ts.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%f") + "0Z"


def person(rng: random.Random, domain: str) -> dict[str, Any]:
    first, last = rng.choice(FIRST), rng.choice(LAST)
    # Mailbox names are ASCII (Salesforce rejects others): Müller -> muller, Zoë -> zoe.
    local = unicodedata.normalize("NFKD", f"{first}.{last}").encode("ascii", "ignore").decode().lower().replace("'", "")
    return {
        "firstName": first,
        "lastName": last,
        "email": f"{local}@{domain}",
        "phoneNumber": f"+1 425 555 {rng.randint(1000, 9999)}",
        "contactPreference": rng.choice(["Email", "Phone", "None"]),
    }


def make_referral(rng: random.Random, now: datetime, organization_id: str, index: int) -> dict[str, Any]:
    company, country, postal, city, state, street = rng.choice(COMPANIES)
    domain = "".join(ch for ch in company.lower().split()[0] if ch.isascii() and ch.isalnum()) + ".example"
    status, substatus = rng.choices([(s, ss) for s, ss, _ in STATUS_MIX], weights=[w for *_, w in STATUS_MIX])[0]
    created = now - timedelta(days=rng.uniform(0.5, 120), seconds=rng.randint(0, 3600))
    updated = min(now, created + timedelta(days=rng.uniform(0, 20)))
    incoming = rng.random() < 0.8
    solution = rng.choice(SOLUTIONS)
    currency = CURRENCY[country]
    doc: dict[str, Any] = {
        "id": str(uuid.UUID(int=rng.getrandbits(128), version=4)),
        "engagementId": str(uuid.UUID(int=rng.getrandbits(128), version=4)),
        "organizationId": organization_id,
        "organizationName": "Sandbox Partner Ltd",
        "name": f"{company} - {rng.choice(DEAL_NAMES)} #{index}",
        "createdDateTime": iso(created),
        "updatedDateTime": iso(updated),
        "expirationDateTime": iso(created + timedelta(days=14)) if status == "New" else None,
        "status": status,
        "substatus": substatus,
        "statusReason": "",
        "type": "Shared" if incoming else rng.choice(["Independent", "Shared"]),
        "qualification": rng.choice(["SalesQualified", "MarketingQualified", "Direct"]),
        "direction": "Incoming" if incoming else "Outgoing",
        "salesStage": rng.choice(["Qualify", "Develop", "Propose", "Close"]) if status != "New" else None,
        "customerProfile": {
            "name": company,
            "size": rng.choice(["1to50employees", "51to1000employees", "1001to10000employees", "over10000employees"]),
            "address": {
                "addressLine1": street,
                "addressLine2": "",
                "city": city,
                "state": state,
                "postalCode": postal,
                "country": country,
                "region": None,
            },
            "team": [person(rng, domain)],
            "ids": [{"profileType": "Duns", "id": str(rng.randint(100000000, 999999999))}],
        },
        "consent": {
            "consentToToShareInfoWithOthers": rng.random() < 0.7,
            "consentToContact": True,
            "consentToShareReferralWithMicrosoftSellers": rng.random() < 0.8,
        },
        "details": {
            "notes": rng.choice(
                ["", "Customer wants a proof of concept in Q3.", "Budget approved; décision en cours."]
            ),
            "dealValue": float(rng.randrange(5_000, 2_000_000, 500)),
            "currency": currency,
            "closingDateTime": iso(now + timedelta(days=rng.randint(15, 240))),
            "requirements": {
                "industries": [],
                "products": [],
                "services": [],
                "solutions": [
                    {"id": solution[0], "name": solution[1], "type": "Name", "publisherName": "Sandbox Partner Ltd"}
                ],
                "additionalRequirements": "",
            },
        },
        "team": [person(rng, "sandboxpartner.example")],
        "inviteContext": {
            "notes": "Please engage the customer's CIO." if incoming else "",
            "assistanceRequestCode": rng.choice(HELP_CODES),
            "invitedBy": {"organizationId": "msft", "organizationName": "Microsoft"} if incoming else None,
        },
        "target": [{"type": "SolutionProfile", "id": solution[0]}],
        "tags": [],
        "lastModifiedVia": "Web",
        "trackingInfo": None,
    }
    if status in ("Active", "Closed"):
        doc["acceptedDateTime"] = iso(created + (updated - created) / 2)
    if status == "Closed":
        doc["closedDateTime"] = iso(updated)
    return doc
