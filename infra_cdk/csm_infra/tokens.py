"""The cluster's two generated secrets, in Secrets Manager and handed to tasks as ECS secrets.

- The API token: the shared secret of the voice API. The bridge's authorizer checks what a person
  presents against it, and the Serve ingress checks the bridge's `Authorization` header against it
  (`CSM_TOKEN`). It lives with the cluster, not the API: the Ray nodes must start with it, and the API
  stack comes after the cluster (it grants the cluster's role and opens the cluster's port), so this is
  the first stack both can read it from.
- Ray's token (`RAY_AUTH_TOKEN`, with `RAY_AUTH_MODE=token`): every Ray node and client presents it, so
  reaching Ray's ports is not enough to run code on the cluster.

Neither rotates on a timer: both are read when a task starts, so a rotation is a restart (README).
"""

from __future__ import annotations

from aws_cdk import aws_secretsmanager as secretsmanager
from constructs import Construct

from csm_infra.nag import acknowledge


class ClusterTokens(Construct):
    def __init__(self, scope: Construct, construct_id: str) -> None:
        super().__init__(scope, construct_id)
        self.api_token = secretsmanager.Secret(
            self,
            "ApiToken",
            description="The voice API's shared token, checked by the bridge's authorizer and the ingress",
            generate_secret_string=secretsmanager.SecretStringGenerator(
                password_length=48, exclude_punctuation=True
            ),
        )
        acknowledge(
            self.api_token,
            "AwsSolutions-SMG4",
            "A shared token rotated by an operator (README): the Ray nodes read it when they start, so a "
            "timed rotation would lock the bridge out until they restart. Cognito users (the authorizer's "
            "other mode) are the way to per-person credentials.",
        )
        self.ray_token = secretsmanager.Secret(
            self,
            "RayAuthToken",
            description="Ray's cluster token (RAY_AUTH_TOKEN): every Ray node and client must present it",
            generate_secret_string=secretsmanager.SecretStringGenerator(
                password_length=64, exclude_punctuation=True
            ),
        )
        acknowledge(
            self.ray_token,
            "AwsSolutions-SMG4",
            "Ray reads its token when a node starts and every node must hold the same one, so a rotation "
            "is a restart of the whole cluster: done on purpose by an operator (README), not on a timer.",
        )
