"""Seed data for the Dataverse emulator: currencies, accounts with contacts, opportunities."""

from __future__ import annotations

import random
import uuid
from datetime import timedelta
from typing import Any

from ..seed import COMPANIES, CURRENCY, DEAL_NAMES, HELP_CODES, SOLUTIONS, person
from . import clock
from .choices import HELP_LABELS
from .schema import ACCOUNTS, CONTACTS, CURRENCIES, OPPORTUNITIES, TRANSACTION_CURRENCIES


class SeedMixin:
    """Seeding of :class:`Dynamics365Emulator`."""

    def _currency_id(self, iso: str) -> str:
        return str(uuid.uuid5(uuid.NAMESPACE_URL, f"dataverse-sandbox:transactioncurrency:{iso}"))

    def _seed_currencies(self) -> None:
        with self.lock:
            for iso, name, symbol, rate in CURRENCIES:
                changes = {
                    "transactioncurrencyid": self._currency_id(iso),
                    "isocurrencycode": iso,
                    "currencyname": name,
                    "currencysymbol": symbol,
                    "exchangerate": rate,
                }
                self._insert(TRANSACTION_CURRENCIES, changes, trusted=True)

    def seed(self, opportunities: int = 0, accounts: int = 0, flagged: int = 0, seed: int = 0) -> dict[str, list[str]]:
        """Realistic rows: accounts with addresses and 1-2 contacts each; opportunities linked to an
        account and one of its contacts, in the account's currency; ``flagged`` of the new
        opportunities marked for co-sell (sync flag, how-can-Microsoft-help, a solution id)."""
        rng = random.Random(seed)
        out: dict[str, list[str]] = {"accounts": [], "contacts": [], "opportunities": []}
        with self.lock:
            existing = len(self.tables["accounts"])
            if opportunities and not existing and not accounts:
                accounts = min(len(COMPANIES), max(1, opportunities // 10))
            for i in range(existing, existing + accounts):
                account_id, contact_ids = self._seed_account(rng, i)
                out["accounts"].append(account_id)
                out["contacts"] += contact_ids
            pool = list(self.tables["accounts"].values())
            contacts_of: dict[str, list[str]] = {}
            for contact in self.tables["contacts"].values():
                parent = contact.get("_parentcustomerid_value")
                if parent:
                    contacts_of.setdefault(parent, []).append(contact["contactid"])
            start = len(self.tables["opportunities"])
            marked = set(rng.sample(range(opportunities), min(flagged, opportunities)))
            today = clock._now().date()
            for n in range(opportunities):
                account = rng.choice(pool)
                country = account.get("address1_country") or "US"
                changes: dict[str, Any] = {
                    "name": f"{account['name']} - {rng.choice(DEAL_NAMES)} #{start + n + 1}"[:300],
                    "estimatedvalue": float(rng.randrange(5_000, 2_000_000, 500)),
                    "_transactioncurrencyid_value": self._currency_id(CURRENCY.get(country, "USD")),
                    "estimatedclosedate": (today + timedelta(days=rng.randint(15, 240))).isoformat(),
                    "description": rng.choice(
                        ["", "Customer wants a proof of concept in Q3.", "Budget approved; décision en cours."]
                    )
                    or None,
                    "salesstage": rng.randint(0, 3),
                    "_parentaccountid_value": account["accountid"],
                    "_parentcontactid_value": rng.choice(contacts_of.get(account["accountid"], [None])),
                }
                if n in marked:
                    changes.update(
                        cosell_syncwithpartnercenter=True,
                        cosell_howcanmicrosofthelp=self.metadata.value_of(
                            "opportunity",
                            "cosell_howcanmicrosofthelp",
                            HELP_LABELS[HELP_CODES.index(rng.choice(HELP_CODES))],
                        ),
                        cosell_solutions=rng.choice(SOLUTIONS)[0],
                    )
                out["opportunities"].append(str(self._insert(OPPORTUNITIES, changes, trusted=True)["opportunityid"]))
        return out

    def _seed_account(self, rng: random.Random, index: int) -> tuple[str, list[str]]:
        company, country, postal, city, state, street = COMPANIES[index % len(COMPANIES)]
        round_ = index // len(COMPANIES)
        name = company if round_ == 0 else f"{company} ({round_ + 1})"
        account = self._insert(
            ACCOUNTS,
            {
                "name": name,
                "address1_line1": street,
                "address1_city": city,
                "address1_stateorprovince": state or None,
                "address1_postalcode": postal,
                "address1_country": country,
            },
            trusted=True,
        )
        domain = "".join(ch for ch in company.lower().split()[0] if ch.isascii() and ch.isalnum()) + ".example"
        contact_ids = []
        for n in range(rng.randint(1, 2)):
            p = person(rng, domain)
            local, _, host = p["email"].partition("@")
            contact = self._insert(
                CONTACTS,
                {
                    "firstname": p["firstName"],
                    "lastname": p["lastName"],
                    "emailaddress1": f"{local}{index + 1}{n}@{host}",  # unique: contacts are matched by email
                    "telephone1": p["phoneNumber"],
                    "_parentcustomerid_value": account["accountid"],
                },
                trusted=True,
            )
            contact_ids.append(str(contact["contactid"]))
        return str(account["accountid"]), contact_ids
