"""An embedded local run (no --address) starts Ray quietly: no advice to change Ray settings
that do not concern a local run, such as Ray 2.60's token-authentication opt-out warning. The
whole run is checked in its own process by the demo's end-to-end test
(tests/test_synthetic_demo.py), which goes through the same driver; here, that a user's own
choice is kept."""

from __future__ import annotations

import os

from pipeline.compute.cluster import _quiet_embedded_token_auth


def test_a_users_own_auth_mode_is_kept(monkeypatch) -> None:
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    _quiet_embedded_token_auth()
    assert os.environ["RAY_AUTH_MODE"] == "disabled"
