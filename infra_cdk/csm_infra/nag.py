"""cdk-nag's AwsSolutions checks, and acknowledgments of the findings we accept, each with its reason.

cdk-nag 3 runs as a policy validation plugin: `cdk synth` fails on any finding not acknowledged.
Acknowledgments sit next to the resource they are about (`acknowledge(...)` in each stack), so a reader
sees the reason where the exception is made.
"""

from __future__ import annotations

from aws_cdk import Acknowledgment, App, Validations
from cdk_nag import AwsSolutionsChecks
from constructs import IConstruct


def add_checks(app: App) -> AwsSolutionsChecks:
    checks = AwsSolutionsChecks(app, verbose=True)
    Validations.of(app).add_plugins(checks)
    return checks


def acknowledge(scope: IConstruct, rule: str, reason: str) -> None:
    """Accept `rule` (an id, or `id[finding]` for one finding of it) for `scope` and what it contains."""
    Validations.of(scope).acknowledge(Acknowledgment(id=rule, reason=reason))
