"""Partner Center reads: a referral as the API shows it, get, and the list with ``$filter``,
``$orderby``, ``$top``, ``$select`` and the documented ``@odata.nextLink``."""

from __future__ import annotations

import base64
import json
from typing import Any

from ..dynamics365.odata import FilterOptions, ODataError, compile_filter, parse_orderby, resolve_path
from ..server import HTTPError, Request, Response, json_copy
from .records import (
    FILTER_PATHS,
    MAX_TOP,
    NEXTLINK_PATH,
    ORDERBY_PATHS,
    REFERRALS_AUDIENCE,
    REFERRALS_PATH,
    SELECTABLE,
    _bad,
)


class QueryMixin:
    """The read handlers of :class:`PartnerCenterEmulator`."""

    # -- referrals ---------------------------------------------------------------
    def _public(self, doc: dict[str, Any], origin: str) -> dict[str, Any]:
        out = json_copy(doc)
        out["links"] = {
            "self": {"uri": f"{origin}{REFERRALS_PATH}/{doc['id']}", "method": "GET", "headers": []},
            "relatedReferrals": {
                "uri": f"{origin}{REFERRALS_PATH}?$filter=engagementId eq '{doc['engagementId']}'",
                "method": "GET",
                "headers": [],
            },
        }
        return out

    def _single(self, doc: dict[str, Any], request: Request, status: int = 200) -> Response:
        headers = {"ETag": doc["eTag"]}
        if status == 201:
            headers["Location"] = f"{request.origin}{REFERRALS_PATH}/{doc['id']}"
        body = {"@odata.context": f"{request.origin}/v1.0/engagements/referrals/$metadata#Referrals/$entity"}
        body.update(self._public(doc, request.origin))
        return Response.json(body, status, headers)

    def _lookup(self, referral_id: str) -> dict[str, Any]:
        doc = self.referrals.get(referral_id)
        if doc is None:
            raise HTTPError(404, "itemNotFound", f"Referral '{referral_id}' was not found.")
        return doc

    def _list(self, request: Request) -> Response:
        self._auth(request, REFERRALS_AUDIENCE)
        token = request.arg("$skiptoken") or request.arg("$skipToken")
        if token:
            try:
                state = json.loads(base64.urlsafe_b64decode(token.encode() + b"=" * (-len(token) % 4)))
                expr, order_expr, top, last = state["f"], state["o"], int(state["t"]), state["k"]
                select = state.get("s") or []
            except (ValueError, KeyError, TypeError):
                raise _bad("The $skiptoken is invalid.") from None
        else:
            expr = request.arg("$filter") or ""
            order_expr = request.arg("$orderby") or "createdDateTime desc"
            top_arg = request.arg("$top") or str(MAX_TOP)
            if not top_arg.isdigit() or not 1 <= int(top_arg) <= MAX_TOP:
                raise _bad(f"The value of $top must be an integer between 1 and {MAX_TOP}.")
            top, last = int(top_arg), None
            select = [f.strip() for f in (request.arg("$select") or "").split(",") if f.strip()]
            unknown = [f for f in select if f not in SELECTABLE]
            if unknown:
                raise _bad(f"Could not find a property named '{unknown[0]}' for $select.")
        try:
            predicate = compile_filter(expr, FilterOptions(allowed_paths=FILTER_PATHS)) if expr else None
            order = parse_orderby(order_expr, ORDERBY_PATHS)
        except ODataError as exc:
            raise _bad(str(exc)) from None
        order = [*order, ("id", order[-1][1] if order else False)]

        def key(doc: dict[str, Any]) -> list[Any]:
            return [resolve_path(doc, path) or "" for path, _ in order]

        def after(item_key: list[Any]) -> bool:
            for (_, desc), a, b in zip(order, item_key, last, strict=True):
                if a != b:
                    return a < b if desc else a > b
            return False

        with self.lock:
            cache_key = (expr, order_expr, self.referrals.version)
            if self._listing is not None and self._listing[0] == cache_key:
                _, ordered, ends = self._listing
            else:
                scope = self.referrals.values() if predicate is None else self.referrals.candidates(predicate)
                ordered = [d for d in scope if predicate is None or predicate(d)]
                for path, desc in reversed(order):
                    ordered.sort(key=lambda d, p=path: resolve_path(d, p) or "", reverse=desc)
                ends = {}
                self._listing = (cache_key, ordered, ends)
        if last is None:
            matches = ordered
        elif (start := ends.get(json.dumps(last))) is not None:
            matches = ordered[start:]  # the previous page of this listing ended there
        else:
            matches = [d for d in ordered if after(key(d))]
        page = matches[:top]
        if page:
            ends[json.dumps(key(page[-1]))] = len(ordered) - len(matches) + len(page)
        body: dict[str, Any] = {
            "@odata.context": f"{request.origin}/v1.0/$metadata#Referrals",
            # The count of the items on this page: the documented list response shows
            # "@odata.count": 1 next to one item and an @odata.nextLink (Microsoft Learn, "Get a list of
            # referrals", https://learn.microsoft.com/partner-center/developer/get-a-list-of-referrals).
            "@odata.count": len(page),
            "value": [self._select(self._public(d, request.origin), select) for d in page],
        }
        if len(matches) > top:
            next_state = {"f": expr, "o": order_expr, "t": top, "k": key(page[-1]), "s": select}
            skiptoken = base64.urlsafe_b64encode(json.dumps(next_state).encode()).decode().rstrip("=")
            if self.nextlink_style == "documented":
                host = request.origin.removeprefix("https://")
                body["@odata.nextLink"] = f"http://{host}{NEXTLINK_PATH}?$skiptoken={skiptoken}"
            else:
                body["@odata.nextLink"] = f"{request.origin}{REFERRALS_PATH}?$skiptoken={skiptoken}"
        return Response.json(body)

    @staticmethod
    def _select(doc: dict[str, Any], select: list[str]) -> dict[str, Any]:
        return {k: v for k, v in doc.items() if k in select} if select else doc

    def _get(self, request: Request) -> Response:
        self._auth(request, REFERRALS_AUDIENCE)
        with self.lock:
            return self._single(self._lookup(request.params["id"]), request)
