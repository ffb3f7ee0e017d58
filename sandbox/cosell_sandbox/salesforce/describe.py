"""Salesforce metadata endpoints: API versions, the version directory, ``limits``,
``describeGlobal``, an object's basic info and ``describe``."""

from __future__ import annotations

from typing import Any

from ..server import Request, Response
from .schema import API_VERSIONS, CURRENCIES, MAX_COLLECTION
from .soql import FieldDef, ObjectDef


class DescribeMixin:
    """The describe and limits handlers of :class:`SalesforceEmulator`."""

    # -- versions, directory, limits, describe --------------------------------------------
    def _versions(self, request: Request) -> Response:
        return Response.json(
            [{"label": label, "url": f"/services/data/v{v}", "version": v} for v, label in API_VERSIONS.items()]
        )

    def _directory(self, request: Request) -> Response:
        base = f"/services/data/v{request.params['version']}"
        names = ["sobjects", "query", "queryAll", "limits", "composite", "jobs"]
        return Response.json({name: f"{base}/{name}" for name in names})

    def _limits(self, request: Request) -> Response:
        with self.lock:
            remaining = max(0, self.daily_limit - self.api_used)
            return Response.json(
                {
                    "ConcurrentAsyncGetReportInstances": {"Max": 200, "Remaining": 200},
                    "DailyApiRequests": {"Max": self.daily_limit, "Remaining": remaining},
                    "DailyAsyncApexExecutions": {"Max": 250000, "Remaining": 250000},
                    "DailyBulkApiBatches": {"Max": 15000, "Remaining": 15000 - len(self.bulk.jobs)},
                    "DailyBulkV2QueryFileStorageMB": {"Max": 976562, "Remaining": 976562},
                    "DailyBulkV2QueryJobs": {"Max": 10000, "Remaining": 10000},
                    "DataStorageMB": {"Max": 1024, "Remaining": 1024},
                    "FileStorageMB": {"Max": 10240, "Remaining": 10240},
                    "SingleEmail": {"Max": 5000, "Remaining": 5000},
                }
            )

    def _object_summary(self, odef: ObjectDef, version: str) -> dict[str, Any]:
        base = f"/services/data/v{version}/sobjects/{odef.name}"
        return {
            "activateable": False,
            "createable": True,
            "custom": odef.custom,
            "customSetting": False,
            "deepCloneable": False,
            "deletable": True,
            "deprecatedAndHidden": False,
            "feedEnabled": odef.name != "OpportunityContactRole",
            "hasSubtypes": False,
            "isInterface": False,
            "isSubtype": False,
            "keyPrefix": odef.key_prefix,
            "label": odef.label,
            "labelPlural": odef.label_plural,
            "layoutable": True,
            "mergeable": odef.name in ("Account", "Contact"),
            "mruEnabled": True,
            "name": odef.name,
            "queryable": True,
            "replicateable": True,
            "retrieveable": True,
            "searchable": odef.name != "OpportunityContactRole",
            "triggerable": True,
            "undeletable": True,
            "updateable": True,
            "urls": {"rowTemplate": f"{base}/{{ID}}", "describe": f"{base}/describe", "sobject": base},
        }

    def _describe_global(self, request: Request) -> Response:
        version = request.params["version"]
        return Response.json(
            {
                "encoding": "UTF-8",
                "maxBatchSize": MAX_COLLECTION,
                "sobjects": [self._object_summary(o, version) for o in self.schema.objects.values()],
            }
        )

    def _sobject_info(self, request: Request) -> Response:
        odef = self._object(request.params["obj"])
        with self.lock:
            recent = sorted(
                (r for r in self.records[odef.name].values() if not r["IsDeleted"]),
                key=lambda r: r["LastModifiedDate"],
                reverse=True,
            )[:3]
            items = [
                self._public(odef, r, request.params["version"], ["Id", "Name"] if "Name" in odef.fields else ["Id"])
                for r in recent
            ]
        return Response.json(
            {"objectDescribe": self._object_summary(odef, request.params["version"]), "recentItems": items}
        )

    @staticmethod
    def _describe_field(fdef: FieldDef) -> dict[str, Any]:
        soap = {
            "id": "tns:ID",
            "reference": "tns:ID",
            "boolean": "xsd:boolean",
            "currency": "xsd:double",
            "double": "xsd:double",
            "percent": "xsd:double",
            "int": "xsd:int",
            "date": "xsd:date",
            "datetime": "xsd:dateTime",
        }.get(fdef.type, "xsd:string")
        textual = fdef.type not in ("boolean", "currency", "double", "percent", "int", "date", "datetime")
        length = fdef.length if textual else 0
        picklist = [
            {
                "active": True,
                "defaultValue": value == fdef.default,
                "label": CURRENCIES.get(value, value) if fdef.name == "CurrencyIsoCode" else value,
                "validFor": None,
                "value": value,
            }
            for value in fdef.picklist
        ]
        return {
            "aggregatable": fdef.type not in ("boolean",) and not fdef.long_text,
            "aiPredictionField": False,
            "autoNumber": False,
            "byteLength": length * 3,
            "calculated": fdef.calculated,
            "calculatedFormula": None,
            "cascadeDelete": False,
            "caseSensitive": False,
            "compoundFieldName": None,
            "controllerName": None,
            "createable": fdef.createable,
            "custom": fdef.custom,
            "defaultValue": fdef.default if fdef.type == "boolean" else None,
            "defaultValueFormula": None,
            "defaultedOnCreate": fdef.defaulted_on_create,
            "dependentPicklist": False,
            "deprecatedAndHidden": False,
            "digits": 0,
            "displayLocationInDecimal": False,
            "encrypted": False,
            "externalId": fdef.external_id,
            "extraTypeInfo": "plaintextarea" if fdef.type == "textarea" else None,
            "filterable": fdef.filterable,
            "filteredLookupInfo": None,
            "formulaTreatNullNumberAsZero": False,
            "groupable": fdef.filterable and fdef.type not in ("currency", "double", "datetime"),
            "highScaleNumber": False,
            "htmlFormatted": False,
            "idLookup": fdef.name == "Id" or fdef.external_id or (fdef.name_field and not fdef.calculated),
            "inlineHelpText": None,
            "label": fdef.label,
            "length": length,
            "mask": None,
            "maskType": None,
            "name": fdef.name,
            "nameField": fdef.name_field,
            "namePointing": False,
            "nillable": fdef.nillable,
            "permissionable": fdef.custom and fdef.nillable,
            "picklistValues": picklist,
            "polymorphicForeignKey": False,
            "precision": fdef.precision,
            "queryByDistance": False,
            "referenceTargetField": None,
            "referenceTo": list(fdef.reference_to),
            "relationshipName": fdef.relationship_name,
            "relationshipOrder": None,
            "restrictedDelete": False,
            "restrictedPicklist": fdef.restricted,
            "scale": fdef.scale,
            "searchPrefilterable": False,
            "soapType": soap,
            "sortable": fdef.sortable,
            "type": fdef.type,
            "unique": fdef.unique,
            "updateable": fdef.updateable,
            "writeRequiresMasterRead": False,
        }

    def _describe(self, request: Request) -> Response:
        odef = self._object(request.params["obj"])
        base = f"/services/data/v{request.params['version']}/sobjects/{odef.name}"
        body = self._object_summary(odef, request.params["version"])
        body.update(
            {
                "actionOverrides": [],
                "childRelationships": [
                    {
                        "cascadeDelete": rel.cascade_delete,
                        "childSObject": rel.child,
                        "deprecatedAndHidden": False,
                        "field": rel.field,
                        "junctionIdListNames": [],
                        "junctionReferenceTo": [],
                        "relationshipName": rel.name,
                        "restrictedDelete": False,
                    }
                    for rel in odef.children
                ],
                "compactLayoutable": True,
                "fields": [self._describe_field(f) for f in odef.fields.values()],
                "listviewable": None,
                "lookupLayoutable": None,
                "namedLayoutInfos": [],
                "networkScopeFieldName": None,
                "recordTypeInfos": [
                    {
                        "active": True,
                        "available": True,
                        "defaultRecordTypeMapping": True,
                        "developerName": "Master",
                        "master": True,
                        "name": "Master",
                        "recordTypeId": "012000000000000AAA",
                        "urls": {"layout": f"{base}/describe/layouts/012000000000000AAA"},
                    }
                ],
                "searchLayoutable": True,
                "sobjectDescribeOption": "FULL",
                "supportedScopes": [{"label": "All " + odef.label_plural.lower(), "name": "everything"}],
            }
        )
        return Response.json(dict(sorted(body.items())))
