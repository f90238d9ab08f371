#!/usr/bin/env python3
"""A Python AI agent calling a Sigil-guarded tool.

It asks the local Sigil agent's Workload API (``$SPIFFE_ENDPOINT_SOCKET``) for
a JWT-SVID whose audience is the tool's name, ``ehr-fhir``, with the
unmodified ``spiffe`` package from PyPI (py-spiffe), and calls the example
EHR tool (``examples/ehr_tool.rs``) with ``Authorization: Bearer``:

    pip install -r examples/python/requirements.txt
    SPIFFE_ENDPOINT_SOCKET=unix:///path/api.sock \\
        python3 examples/python/agent.py http://127.0.0.1:8443/fhir/Patient/example

Prints the tool's answer as one JSON line; exits 1 when the tool refuses.
"""

import json
import sys
import urllib.error
import urllib.request

from spiffe import WorkloadApiClient

AUDIENCE = "ehr-fhir"


def main() -> int:
    url = sys.argv[1] if len(sys.argv) > 1 else "http://127.0.0.1:8443/fhir/Patient/example"

    # One token per tool: the audience is exactly the tool we are about to call.
    with WorkloadApiClient() as client:
        svid = client.fetch_jwt_svid(audience={AUDIENCE})
    print(f"agent.py: JWT-SVID for {AUDIENCE} as {svid.spiffe_id}", file=sys.stderr)

    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {svid.token}"})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            body = json.load(response)
            status = response.status
    except urllib.error.HTTPError as e:
        # 401: the token is missing or invalid for this tool; 403: valid, but
        # the tool's policy (e.g. its minimum assurance level) refuses it.
        print(f"agent.py: {url} refused: {e.code} {e.headers.get('WWW-Authenticate')}", file=sys.stderr)
        return 1
    print(json.dumps({"spiffe_id": str(svid.spiffe_id), "status": status, "body": body}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
