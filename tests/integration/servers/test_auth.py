"""Issue 24, case 6: credentials on every opened door of the stack (infra/local_stack.py --auth).

The session's stack (tests/integration/conftest.py) runs with credentials: a request without them is refused by
MLflow and Prefect, one with them is served; the served pipeline of test_deployment.py runs through the same
doors with pkdot's clients, which read the credentials from the environment. Ray's listeners are on 127.0.0.1
(opened, they take Ray's token authentication: tests/reliability/test_ray_listeners.py).
"""

from __future__ import annotations

import base64
import urllib.error
import urllib.request

import pytest

pytestmark = pytest.mark.integration


def _status(url: str, *, method: str = "GET", user_password: str | None = None) -> int:
    request = urllib.request.Request(url, method=method, data=b"{}" if method == "POST" else None)
    request.add_header("Content-Type", "application/json")
    if user_password:
        request.add_header("Authorization", "Basic " + base64.b64encode(user_password.encode()).decode())
    try:
        with urllib.request.urlopen(request, timeout=30) as resp:
            return resp.status
    except urllib.error.HTTPError as exc:
        return exc.code


def test_unauthenticated_requests_are_refused_and_authenticated_ones_served(it, stack_env) -> None:
    mlflow = stack_env["MLFLOW_TRACKING_URI"] + "/api/2.0/mlflow/experiments/search?max_results=1"
    prefect = stack_env["PREFECT_API_URL"] + "/flows/filter"
    user = f"{it.SECRETS['MLFLOW_TRACKING_USERNAME']}:{it.SECRETS['MLFLOW_TRACKING_PASSWORD']}"
    assert _status(mlflow) == 401
    assert _status(mlflow, user_password="pkdot-admin:wrong-password-123") == 401
    assert _status(mlflow, user_password=user) == 200
    assert _status(prefect, method="POST") == 401
    assert _status(prefect, method="POST", user_password=it.SECRETS["PREFECT_API_AUTH_STRING"]) == 200
    # the client environment the stack prints carries no secret (they come from .env only)
    printed = "\n".join(
        f"{k}={v}" for k, v in stack_env.items() if k in ("MLFLOW_TRACKING_URI", "PREFECT_API_URL")
    )
    assert not any(secret in printed for secret in it.SECRETS.values())


def test_credentials_are_required_to_start_an_authenticated_stack(it, tmp_path, monkeypatch) -> None:
    local_stack_module = it.local_stack
    monkeypatch.delenv("PREFECT_API_AUTH_STRING", raising=False)
    stack = local_stack_module.LocalStack(tmp_path, free_ports=True, auth=True)
    with pytest.raises(local_stack_module.StackError, match="PREFECT_API_AUTH_STRING not set"):
        stack.start(["prefect"])
    opened = local_stack_module.LocalStack(tmp_path, free_ports=True, ray_node_ip="10.1.2.3")
    assert opened.auth  # opening Ray turns credentials on
