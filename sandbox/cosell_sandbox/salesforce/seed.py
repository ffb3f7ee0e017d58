"""Seed data for the Salesforce emulator: accounts, contacts, opportunities and contact roles."""

from __future__ import annotations

import random
import unicodedata
from datetime import timedelta
from typing import Any

from ..seed import COMPANIES, CURRENCY, DEAL_NAMES, FIRST, HELP_CODES, LAST, SOLUTIONS
from .schema import CURRENCIES, STAGE_WEIGHTS, STAGES, USER_ID
from .soql import ObjectDef, sf_datetime


class SeedMixin:
    """Seeding of :class:`SalesforceEmulator`."""

    def seed(
        self, opportunities: int = 10, accounts: int | None = None, flagged: int = 0, seed: int = 0
    ) -> dict[str, list[str]]:
        """Realistic accounts (billing addresses), contacts (emails) and opportunities linked to accounts
        with a primary contact role; ``flagged`` of them are set to sync with Partner Center."""
        rng = random.Random(seed)
        if accounts is None:
            accounts = max(1, (opportunities + 2) // 3) if opportunities else 0
        flagged = min(flagged, opportunities)
        now = self._now()
        ids: dict[str, list[str]] = {
            "accounts": [],
            "contacts": [],
            "opportunities": [],
            "flagged": [],
            "contact_roles": [],
        }
        with self.lock:
            stamps: list[int] = []

            def when(days: float) -> tuple[str, str, int]:
                created = now - timedelta(days=days, seconds=rng.randint(0, 3600))
                modified = min(now - timedelta(seconds=1), created + timedelta(days=rng.uniform(0, days / 2)))
                ms = int(modified.timestamp() * 1000)
                stamps.append(ms)
                return sf_datetime(created), sf_datetime(modified), ms

            def store(odef: ObjectDef, values: dict[str, Any], age: float) -> dict[str, Any]:
                created, modified, _ms = when(age)
                record = {name: None for name in odef.fields}
                for fdef in odef.fields.values():
                    if fdef.default is not None:
                        record[fdef.name] = fdef.default
                record.update(values)
                self._new_record(odef, record, created, modified)
                if "OwnerId" in odef.fields:
                    record["OwnerId"] = USER_ID
                self._derive(odef, record)
                self._put(odef.name, record)
                return record

            account_rows: list[tuple[dict[str, Any], list[dict[str, Any]], str, str]] = []
            for i in range(accounts):
                company, country, postal, city, state, street = COMPANIES[i % len(COMPANIES)]
                name = company if i < len(COMPANIES) else f"{company} ({city} {i // len(COMPANIES) + 1})"
                account = store(
                    self.schema.objects["Account"],
                    {
                        "Name": name,
                        "BillingStreet": street,
                        "BillingCity": city,
                        "BillingState": state or None,
                        "BillingPostalCode": postal,
                        "BillingCountry": country,
                    },
                    rng.uniform(60, 365),
                )
                ids["accounts"].append(account["Id"])
                domain = "".join(ch for ch in company.lower().split()[0] if ch.isascii() and ch.isalnum()) + ".example"
                contacts = []
                for _ in range(rng.randint(1, 3)):
                    first, last = rng.choice(FIRST), rng.choice(LAST)
                    plain = unicodedata.normalize("NFKD", f"{first}.{last}".lower())
                    local = "".join(ch for ch in plain if ch.isascii() and (ch.isalnum() or ch == "."))
                    contact = store(
                        self.schema.objects["Contact"],
                        {
                            "AccountId": account["Id"],
                            "FirstName": first,
                            "LastName": last,
                            "Email": f"{local}{rng.randint(1, 99)}@{domain}",
                            "Phone": f"+1 425 555 {rng.randint(1000, 9999)}",
                        },
                        rng.uniform(30, 60),
                    )
                    contacts.append(contact)
                    ids["contacts"].append(contact["Id"])
                account_rows.append((account, contacts, CURRENCY.get(country, "USD"), company))
            flagged_at = set(rng.sample(range(opportunities), flagged)) if flagged else set()
            for i in range(opportunities):
                values: dict[str, Any] = {
                    "StageName": rng.choices(STAGES, weights=STAGE_WEIGHTS)[0],
                    "CloseDate": (now.date() + timedelta(days=rng.randint(-60, 240))).isoformat(),
                    "Amount": float(rng.randrange(5_000, 2_000_000, 500)),
                    "Description": rng.choice(
                        [
                            "",
                            "Customer evaluating a migration in Q3.",
                            "Budget approved; décision en cours.",
                            "Renewal.",
                        ]
                    )
                    or None,
                }
                if account_rows:
                    account, contacts, currency, company = rng.choice(account_rows)
                    values.update(
                        AccountId=account["Id"],
                        CurrencyIsoCode=currency if currency in CURRENCIES else "USD",
                        Name=f"{company} - {rng.choice(DEAL_NAMES)} #{i + 1}"[:120],
                    )
                else:
                    contacts = []
                    values["Name"] = f"{rng.choice(DEAL_NAMES)} #{i + 1}"
                if i in flagged_at:
                    solutions = rng.sample([s[0] for s in SOLUTIONS], rng.randint(1, 2))
                    values.update(
                        PC_Sync_With_Partner_Center__c=True,
                        PC_How_Can_Microsoft_Help__c=rng.choice(HELP_CODES),
                        PC_Solutions__c=";".join(solutions),
                    )
                opp = store(self.schema.objects["Opportunity"], values, rng.uniform(1, 29))
                ids["opportunities"].append(opp["Id"])
                if i in flagged_at:
                    ids["flagged"].append(opp["Id"])
                if contacts:
                    role = store(
                        self.schema.objects["OpportunityContactRole"],
                        {
                            "OpportunityId": opp["Id"],
                            "ContactId": rng.choice(contacts)["Id"],
                            "Role": rng.choice(["Decision Maker", "Economic Buyer", "Technical Buyer"]),
                            "IsPrimary": True,
                        },
                        rng.uniform(1, 29),
                    )
                    ids["contact_roles"].append(role["Id"])
            if stamps:
                self._last_ms = max(self._last_ms, max(stamps))
        return ids
