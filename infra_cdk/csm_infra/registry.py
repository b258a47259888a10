"""The image registry: the ECR repository the GPU image (`Dockerfile.gpu`) is pushed to.

A stack of its own because the image must be pushed before the cluster can start tasks from it:
`cdk deploy CsmRegistry`, `docker push`, then `cdk deploy --all` (README). Tags are immutable, so a
tag always names the same image and a rollback is a context change; images are scanned on push.
"""

from __future__ import annotations

from aws_cdk import CfnOutput, RemovalPolicy, Stack
from aws_cdk import aws_ecr as ecr
from constructs import Construct

from csm_infra.config import Settings


class RegistryStack(Stack):
    def __init__(self, scope: Construct, construct_id: str, *, settings: Settings, **kwargs) -> None:
        super().__init__(scope, construct_id, **kwargs)
        self.repository = ecr.Repository(
            self,
            "Repository",
            repository_name=settings.image_repository,
            image_tag_mutability=ecr.TagMutability.IMMUTABLE,
            image_scan_on_push=True,
            encryption=ecr.RepositoryEncryption.KMS,
            lifecycle_rules=[ecr.LifecycleRule(description="keep the last 10 images", max_image_count=10)],
            removal_policy=RemovalPolicy.RETAIN,
        )
        CfnOutput(self, "RepositoryUri", value=self.repository.repository_uri)
