"""Storage: one encrypted EFS file system with two access points, mounted by every Ray node.

- `/weights`: the model (`MODEL_PATH=/weights/csm-1b`) and voices (`/weights/voices`). Never baked into
  the image: the weights download task writes them once; the Ray nodes mount them read-only.
- `/history`: conversation history (`HISTORY_DIR`), written by the ingress, so a restart or a replaced
  node loses nothing said.

Both access points pin the POSIX user to the image's user (uid/gid 1000), so files have one owner
whatever the client. The file system policy admits only IAM-authenticated clients, over TLS, through an
access point, never as root; which access point a client may mount, and whether it may write, is in
each client's task role. The file system is backed up daily and kept when the stack is deleted: it
holds what people said.
"""

from __future__ import annotations

from aws_cdk import RemovalPolicy, Stack
from aws_cdk import aws_ec2 as ec2
from aws_cdk import aws_efs as efs
from aws_cdk import aws_iam as iam
from aws_cdk import aws_kms as kms
from constructs import Construct

APP_UID = "1000"  # the image's `ray` user (Dockerfile.gpu)


_CLIENT_ACTIONS = [
    "elasticfilesystem:ClientMount",
    "elasticfilesystem:ClientWrite",
    "elasticfilesystem:ClientRootAccess",
]
# On top of CDK's policy (IAM-authenticated clients only, through a mount target): TLS always, no root,
# and always through an access point, so every client is uid 1000 under /weights or /history.
_DENIALS = (
    iam.PolicyStatement(
        sid="DenyUnencryptedTransport",
        effect=iam.Effect.DENY,
        principals=[iam.AnyPrincipal()],
        actions=["*"],
        conditions={"Bool": {"aws:SecureTransport": "false"}},
    ),
    iam.PolicyStatement(
        sid="DenyRootAccess",
        effect=iam.Effect.DENY,
        principals=[iam.AnyPrincipal()],
        actions=["elasticfilesystem:ClientRootAccess"],
    ),
    iam.PolicyStatement(
        sid="DenyWithoutAccessPoint",
        effect=iam.Effect.DENY,
        principals=[iam.AnyPrincipal()],
        actions=_CLIENT_ACTIONS,
        conditions={"Null": {"elasticfilesystem:AccessPointArn": "true"}},
    ),
)


class StorageStack(Stack):
    def __init__(self, scope: Construct, construct_id: str, *, vpc: ec2.IVpc, **kwargs) -> None:
        super().__init__(scope, construct_id, **kwargs)
        key = kms.Key(
            self,
            "Key",
            description="EFS: model weights and conversation history",
            enable_key_rotation=True,
            removal_policy=RemovalPolicy.RETAIN,
        )
        self.file_system = efs.FileSystem(
            self,
            "FileSystem",
            vpc=vpc,
            vpc_subnets=ec2.SubnetSelection(subnet_type=ec2.SubnetType.PRIVATE_WITH_EGRESS),
            encrypted=True,
            kms_key=key,
            allow_anonymous_access=False,
            enable_automatic_backups=True,
            performance_mode=efs.PerformanceMode.GENERAL_PURPOSE,
            throughput_mode=efs.ThroughputMode.ELASTIC,  # weights load at full speed, idle costs nothing
            lifecycle_policy=efs.LifecyclePolicy.AFTER_30_DAYS,
            removal_policy=RemovalPolicy.RETAIN,
        )
        for statement in _DENIALS:
            self.file_system.add_to_resource_policy(statement)
        self.weights = self._access_point("Weights", "/weights")
        self.history = self._access_point("History", "/history")

    def _access_point(self, name: str, path: str) -> efs.AccessPoint:
        return self.file_system.add_access_point(
            name,
            path=path,
            posix_user=efs.PosixUser(uid=APP_UID, gid=APP_UID),
            create_acl=efs.Acl(owner_uid=APP_UID, owner_gid=APP_UID, permissions="750"),
        )
