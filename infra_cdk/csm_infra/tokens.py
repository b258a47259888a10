"""The deployment's generated secrets, in Secrets Manager, read by the bridge Lambdas and handed to the Ray
tasks as ECS secrets.

`ApiTokens` live with the API, which is deployed before the cluster (the cluster's ingress is configured
with the API's `@connections` URL, so the API must exist first):
- The users' token: the shared secret of the voice API. The bridge's authorizer checks what a person
  presents against it; the Serve ingress checks it on its own direct socket (`CSM_TOKEN`).
- The bridge token: the bridge Lambdas' own credential towards the Serve ingress (`Authorization:
  Bearer` on `/bridge/*`, `CSM_BRIDGE_TOKEN` in the Ray tasks). The users' token does not open those
  routes, so whoever holds it cannot speak for another principal or open conversations behind the
  authorizer's back; only the bridge handlers (not the authorizer) may read this one.

`ClusterTokens` live with the cluster: Ray's token (`RAY_AUTH_TOKEN`, with `RAY_AUTH_MODE=token`): every
Ray node and client presents it, so reaching Ray's ports is not enough to run code on the cluster.

None rotates on a timer: each is read when a task or a Lambda container starts, so a rotation is a
restart (README).
"""

from __future__ import annotations

from aws_cdk import aws_secretsmanager as secretsmanager
from constructs import Construct

from csm_infra.nag import acknowledge


def _generated(scope: Construct, construct_id: str, description: str, length: int) -> secretsmanager.Secret:
    return secretsmanager.Secret(
        scope,
        construct_id,
        description=description,
        generate_secret_string=secretsmanager.SecretStringGenerator(
            password_length=length, exclude_punctuation=True
        ),
    )


class ApiTokens(Construct):
    def __init__(self, scope: Construct, construct_id: str) -> None:
        super().__init__(scope, construct_id)
        self.api_token = _generated(
            self,
            "ApiToken",
            "The voice API's shared token, checked by the bridge's authorizer and the ingress",
            48,
        )
        acknowledge(
            self.api_token,
            "AwsSolutions-SMG4",
            "A shared token rotated by an operator (README): the Ray nodes read it when they start, so a "
            "timed rotation would lock people out until they restart. Cognito users (the authorizer's "
            "other mode) are the way to per-person credentials.",
        )
        self.bridge_token = _generated(
            self,
            "BridgeToken",
            "The bridge Lambdas' own token for the Serve ingress's /bridge routes (CSM_BRIDGE_TOKEN)",
            64,
        )
        acknowledge(
            self.bridge_token,
            "AwsSolutions-SMG4",
            "The ingress reads the bridge token when a Ray node starts and the Lambdas once per container, "
            "so a timed rotation would lock the bridge out until both restart: an operator rotates it "
            "(README).",
        )


class ClusterTokens(Construct):
    def __init__(self, scope: Construct, construct_id: str) -> None:
        super().__init__(scope, construct_id)
        self.ray_token = _generated(
            self,
            "RayAuthToken",
            "Ray's cluster token (RAY_AUTH_TOKEN): every Ray node and client must present it",
            64,
        )
        acknowledge(
            self.ray_token,
            "AwsSolutions-SMG4",
            "Ray reads its token when a node starts and every node must hold the same one, so a rotation "
            "is a restart of the whole cluster: done on purpose by an operator (README), not on a timer.",
        )
