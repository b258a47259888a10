"""The weights download task: `csm-demo download` run once in the cluster, writing to EFS `/weights`.

Weights are never baked into the image. This one-off task (`aws ecs run-task`, README) fetches
`sesame/csm-1b` from the Hugging Face Hub with the token an operator puts into the `HfToken` secret,
and writes it where the Ray nodes read it (`MODEL_PATH`). It is the only writer of the weights access
point, and makes them appear at once (a staging folder renamed into place), so the head, which
deploys the app when `MODEL_PATH/config.json` exists, never sees half a checkpoint. It needs no GPU,
so it fits beside the head.
"""

from __future__ import annotations

import shlex
from pathlib import PurePosixPath

from aws_cdk import RemovalPolicy
from aws_cdk import aws_ecs as ecs
from aws_cdk import aws_iam as iam
from aws_cdk import aws_logs as logs
from aws_cdk import aws_secretsmanager as secretsmanager
from constructs import Construct

from csm_infra.nag import acknowledge
from csm_infra.ray_task import Mounts, acknowledge_execution_role

CSM_DEMO = "/opt/venv/bin/csm-demo"


def download_script(hf_repo: str, model_path: str) -> str:
    """Download into a staging folder, then rename it into place: the head deploys the app as soon as
    `MODEL_PATH/config.json` exists, so the weights must appear all at once (a rename on EFS is atomic).
    Nothing is done when the weights are already there."""
    model = PurePosixPath(model_path)
    staging = model.with_name(f".{model.name}.partial")
    q = shlex.quote
    done = f"{model} already holds weights"
    return "\n".join(
        [
            "set -eu",
            f"if [ -f {q(str(model / 'config.json'))} ]; then echo {q(done)}; exit 0; fi",
            f"rm -rf {q(str(staging))}",
            f"{CSM_DEMO} download --repo {q(hf_repo)} --dir {q(str(staging))}",
            f"mv -T {q(str(staging))} {q(str(model))}",
            f"echo {q(f'weights ready in {model}')}",
        ]
    )


class WeightsDownloadTask(Construct):
    def __init__(
        self,
        scope: Construct,
        construct_id: str,
        *,
        image: ecs.ContainerImage,
        mounts: Mounts,
        hf_repo: str,
        model_path: str,
    ) -> None:
        super().__init__(scope, construct_id)
        self.hf_token = secretsmanager.Secret(
            self,
            "HfToken",
            description="A Hugging Face token that may read sesame/csm-1b (gated): put yours here",
        )
        acknowledge(
            self.hf_token,
            "AwsSolutions-SMG4",
            "A third-party (Hugging Face) token that AWS cannot rotate; it is used once, to download the "
            "weights, and can be deleted afterwards.",
        )
        task_role = iam.Role(self, "TaskRole", assumed_by=iam.ServicePrincipal("ecs-tasks.amazonaws.com"))
        task_role.add_to_policy(
            iam.PolicyStatement(
                actions=["elasticfilesystem:ClientMount", "elasticfilesystem:ClientWrite"],
                resources=[mounts.file_system.file_system_arn],
                conditions={
                    "StringEquals": {"elasticfilesystem:AccessPointArn": mounts.weights.access_point_arn}
                },
            )
        )
        self.task_definition = ecs.Ec2TaskDefinition(
            self,
            "TaskDefinition",
            family="csm-weights-download",
            network_mode=ecs.NetworkMode.AWS_VPC,
            task_role=task_role,
            volumes=[
                ecs.Volume(
                    name="weights",
                    efs_volume_configuration=ecs.EfsVolumeConfiguration(
                        file_system_id=mounts.file_system.file_system_id,
                        transit_encryption="ENABLED",
                        authorization_config=ecs.AuthorizationConfig(
                            access_point_id=mounts.weights.access_point_id, iam="ENABLED"
                        ),
                    ),
                )
            ],
        )
        linux = ecs.LinuxParameters(self, "Linux", init_process_enabled=True)
        linux.drop_capabilities(ecs.Capability.ALL)
        container = self.task_definition.add_container(
            "download",
            image=image,
            entry_point=["/bin/sh", "-c"],
            command=[download_script(hf_repo, model_path)],
            cpu=512,
            memory_limit_mib=2048,
            linux_parameters=linux,
            secrets={"HF_TOKEN": ecs.Secret.from_secrets_manager(self.hf_token)},
            logging=ecs.LogDrivers.aws_logs(
                stream_prefix="download",
                log_group=logs.LogGroup(
                    self, "Logs", retention=logs.RetentionDays.ONE_MONTH, removal_policy=RemovalPolicy.DESTROY
                ),
            ),
        )
        container.add_mount_points(
            ecs.MountPoint(container_path="/weights", source_volume="weights", read_only=False)
        )
        acknowledge_execution_role(self.task_definition)
        acknowledge(
            self.task_definition,
            "AwsSolutions-ECS2",
            "The one variable is AWS_REGION, which CDK adds; the Hugging Face token is an ECS secret.",
        )
