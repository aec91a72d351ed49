"""The HTTP API: FHIR R4 at ``/fhir``, SMART on FHIR Backend Services, the ledger explorer.

* :mod:`medledger.api.app` -- ``create_app(settings)``, the FastAPI application;
* :mod:`medledger.api.settings` -- where the data lives and the URL clients use;
* :mod:`medledger.api.runtime` -- the node and services of one data directory;
* :mod:`medledger.api.fhir_routes` -- the FHIR and token endpoints;
* :mod:`medledger.api.deps` -- bearer token to caller;
* :mod:`medledger.api.smart`, :mod:`medledger.api.scopes` -- the authorisation server;
* :mod:`medledger.api.explorer` -- ledger explorer and demo sign-in for the portal.

The FHIR semantics live in :mod:`medledger.services.fhir`; nothing is imported here so
that importing a submodule stays cheap.
"""
