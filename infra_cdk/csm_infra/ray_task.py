"""A Ray node as an ECS task: the GPU image running `docker/entrypoint.py head` or `... worker`.

EC2 launch type (Fargate has no GPUs), one GPU per task (so one Ray node per g4dn instance), awsvpc
networking (each task has its own address and the Ray security group). /dev/shm is sized for Ray's
object store (Ray keeps it there; Docker's 64 MB default would push it to disk). The EFS access points
are mounted with TLS and IAM authorization: weights read-only, history read-write. The container runs
as the image's non-root user with every Linux capability dropped; secrets come from Secrets Manager
through ECS, never through the environment of the task definition.
"""

from __future__ import annotations

from dataclasses import dataclass

from aws_cdk import Duration, RemovalPolicy
from aws_cdk import aws_ecs as ecs
from aws_cdk import aws_efs as efs
from aws_cdk import aws_iam as iam
from aws_cdk import aws_logs as logs
from aws_cdk import aws_secretsmanager as secretsmanager
from constructs import Construct

from csm_infra.nag import acknowledge

PYTHON = "/opt/venv/bin/python"  # Dockerfile.gpu's virtual environment
SHM_MIB = 3072
OBJECT_STORE_BYTES = 2 * 1024**3  # must fit in /dev/shm
# Sized for the smallest instance type of settings.instance_types, and so for both defaults: a g4dn.xlarge
# (4 vCPUs, registers about 15.5 GiB with ECS) and a g4dn.2xlarge (8 vCPUs, about 31 GiB), each with one
# T4. A Ray node reserves 12 GiB (and may use more) and 3.5 vCPUs, which leaves room for the weights
# download task (0.5 vCPU, 2 GiB) next to the head; the one GPU per instance keeps it to one Ray node.
RAY_MEMORY_RESERVATION_MIB = 12 * 1024
RAY_CPU_UNITS = 3584


@dataclass(frozen=True)
class Mounts:
    """The EFS access points every Ray node mounts."""

    file_system: efs.IFileSystem
    weights: efs.IAccessPoint
    history: efs.IAccessPoint


class RayNodeTask(Construct):
    """One task definition for a Ray node; `role` is `head` or `worker`."""

    def __init__(
        self,
        scope: Construct,
        construct_id: str,
        *,
        role: str,
        image: ecs.ContainerImage,
        task_role: iam.IRole,
        mounts: Mounts,
        environment: dict[str, str],
        secrets: dict[str, secretsmanager.ISecret],
    ) -> None:
        super().__init__(scope, construct_id)
        self.task_definition = ecs.Ec2TaskDefinition(
            self,
            "TaskDefinition",
            family=f"csm-ray-{role}",
            network_mode=ecs.NetworkMode.AWS_VPC,
            task_role=task_role,
            volumes=[
                _efs_volume("weights", mounts.file_system, mounts.weights),
                _efs_volume("history", mounts.file_system, mounts.history),
            ],
        )
        log_group = logs.LogGroup(
            self, "Logs", retention=logs.RetentionDays.ONE_MONTH, removal_policy=RemovalPolicy.DESTROY
        )
        linux = ecs.LinuxParameters(self, "Linux", init_process_enabled=True, shared_memory_size=SHM_MIB)
        linux.drop_capabilities(ecs.Capability.ALL)
        self.container = self.task_definition.add_container(
            "ray",
            image=image,
            command=[role],
            gpu_count=1,
            cpu=RAY_CPU_UNITS,
            memory_reservation_mib=RAY_MEMORY_RESERVATION_MIB,
            linux_parameters=linux,
            environment={**environment, "CSM_RAY_OBJECT_STORE_BYTES": str(OBJECT_STORE_BYTES)},
            secrets={name: ecs.Secret.from_secrets_manager(secret) for name, secret in secrets.items()},
            logging=ecs.LogDrivers.aws_logs(stream_prefix=role, log_group=log_group),
            health_check=ecs.HealthCheck(
                command=[
                    "CMD",
                    PYTHON,
                    "/app/docker/healthcheck.py",
                    *(["--head"] if role == "head" else []),
                ],
                interval=Duration.seconds(30),
                timeout=Duration.seconds(5),
                retries=3,
                start_period=Duration.seconds(180),
            ),
            ulimits=[ecs.Ulimit(name=ecs.UlimitName.NOFILE, soft_limit=65536, hard_limit=65536)],
            stop_timeout=Duration.seconds(120),
            port_mappings=[
                ecs.PortMapping(container_port=8000, name="serve"),
                ecs.PortMapping(container_port=6379, name="gcs"),
            ],
        )
        self.container.add_mount_points(
            ecs.MountPoint(container_path="/weights", source_volume="weights", read_only=True),
            ecs.MountPoint(container_path="/history", source_volume="history", read_only=False),
        )
        acknowledge_execution_role(self.task_definition)
        acknowledge(
            self.task_definition,
            "AwsSolutions-ECS2",
            "The environment holds only non-secret settings (paths, device, the head's address); the "
            "tokens come from Secrets Manager through the task definition's secrets.",
        )


def ray_task_role(scope: Construct, construct_id: str, mounts: Mounts, metrics_namespace: str) -> iam.Role:
    """What the Ray processes of a node may do: publish the cluster's load (to their namespace only),
    mount the two access points (history writable, weights not). The cluster adds posting to the API
    stage's connections (`ClusterStack._grant_callbacks`), and for the head, the drain handler's reads."""
    role = iam.Role(
        scope,
        construct_id,
        assumed_by=iam.ServicePrincipal("ecs-tasks.amazonaws.com"),
        description="Ray nodes: CloudWatch metrics, EFS (and @connections of the API stage)",
    )
    role.add_to_policy(
        iam.PolicyStatement(
            actions=["cloudwatch:PutMetricData"],
            resources=["*"],
            conditions={"StringEquals": {"cloudwatch:namespace": metrics_namespace}},
        )
    )
    access_points = [mounts.weights.access_point_arn, mounts.history.access_point_arn]
    role.add_to_policy(
        iam.PolicyStatement(
            actions=["elasticfilesystem:ClientMount"],
            resources=[mounts.file_system.file_system_arn],
            conditions={"StringEquals": {"elasticfilesystem:AccessPointArn": access_points}},
        )
    )
    role.add_to_policy(
        iam.PolicyStatement(
            actions=["elasticfilesystem:ClientWrite"],
            resources=[mounts.file_system.file_system_arn],
            conditions={
                "StringEquals": {"elasticfilesystem:AccessPointArn": mounts.history.access_point_arn}
            },
        )
    )
    acknowledge(
        role,
        "AwsSolutions-IAM5[Resource::*]",
        "cloudwatch:PutMetricData has no resource type; the statement is limited to the cluster's own "
        f"namespace ({metrics_namespace}) by condition.",
    )
    return role


def acknowledge_execution_role(task_definition: ecs.TaskDefinition) -> None:
    acknowledge(
        task_definition,
        "AwsSolutions-IAM5[Resource::*]",
        "The execution role's ecr:GetAuthorizationToken, which takes no resource; pulling is limited to "
        "the image's repository and the log stream to the task's log group.",
    )


def _efs_volume(name: str, file_system: efs.IFileSystem, access_point: efs.IAccessPoint) -> ecs.Volume:
    return ecs.Volume(
        name=name,
        efs_volume_configuration=ecs.EfsVolumeConfiguration(
            file_system_id=file_system.file_system_id,
            transit_encryption="ENABLED",
            authorization_config=ecs.AuthorizationConfig(
                access_point_id=access_point.access_point_id, iam="ENABLED"
            ),
        ),
    )
