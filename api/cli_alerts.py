"""`asr alerts`: what the engine raised and resolved for the operators, and whether the webhook heard it."""
from __future__ import annotations

import click

from api.cli import main
from api.cli_output import _emit_json, json_option, print_table
from api.cli_service import _command, _OpGroup, _service


@main.group(cls=_OpGroup)
def alerts():
    """Alerts: a VM Critical, an RPO past its threshold, a host agent silent, a failed failover or failback, a
    drill overdue. Raised when a condition starts and resolved when it ends, each POSTed (signed) to
    ASR_ALERT_WEBHOOK_URL and retried until it is heard (docs/operations.md, "Alerts")."""


@_command(alerts, "list")
@click.option("--active", is_flag=True, help="Only conditions that still hold (and failed operations).")
@click.option("--limit", type=click.IntRange(1, 1000), default=50, show_default=True, help="How many, newest first.")
@json_option
def alerts_list(active: bool, limit: int, as_json: bool):
    """Alerts, newest first: when, what, about which VM or host, and their delivery to the webhook."""
    rows = _service().list_alerts(active=active, limit=limit)
    if as_json:
        return _emit_json(rows)
    print_table(rows, [("when", "created_at"), ("event", "event"), ("kind", "kind"), ("severity", "severity"),
                       ("subject", "subject"), ("delivery", "delivery"), ("message", "message")],
                empty="no alerts" + (" active" if active else ""))
