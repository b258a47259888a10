"""The cluster: Ray on ECS. A Ray head service, a GPU worker service that joins it, and their scaling.

- The head (one task) runs Ray's GCS and Serve's controller and, like every node, one replica of each
  model deployment on its GPU. It is registered in Cloud Map as `ray-head.csm.internal`: the workers
  join it there and the bridge Lambdas reach the Serve ingress there (`SERVE_URL`).
- Workers (`min_nodes - 1` to `max_nodes - 1` tasks) add GPUs. ECS scales them on the load the head
  publishes to CloudWatch (`serve_app/cloudwatch_metrics.py`): generator requests in flight per node.
  A worker that finds no free GPU makes the capacity provider add an instance.
- One security group for all Ray tasks: Ray's ports between its own members only (Ray runs whatever a
  client that reaches its GCS sends it, so nothing else may reach it; Ray's token authentication is on
  as a second lock), and Serve's HTTP port 8000 from the bridge Lambdas' group alone.
- The API stack comes first and hands over a `BridgeLink`: the users' token (`CSM_TOKEN`), the bridge's
  own token (`CSM_BRIDGE_TOKEN`, which alone opens the ingress's `/bridge/*` routes), and its stage,
  whose `@connections` URL is the ingress's one callback (`CSM_BRIDGE_CALLBACK_URL`) and the one place
  the task role may post to.
- Both services roll back a failed deployment (circuit breaker). The head allows no second copy during
  a deployment (two heads would be two clusters; there is one GPU per instance anyway).
- Spot: the head is placed on on-demand instances only (`attribute:csm.lifecycle == on-demand`, set by
  each instance's user data, csm_infra/capacity.py); workers go anywhere. EC2's interruption notices and
  rebalance recommendations reach the head's drain handler through a queue (csm_infra/drain.py,
  `CSM_DRAIN_QUEUE_URL`), which drains the Ray node before the instance goes.
- The head and the workers have task roles of their own: the same permissions, plus, for the head only,
  the drain handler's (take notices off the queue, read the cluster's container instances and tasks).
  One role for both would give every worker those too (a task role is per task definition, so a
  head-only policy needs a head-only role anyway).
"""

from __future__ import annotations

from dataclasses import dataclass

from aws_cdk import CfnOutput, Duration, Stack
from aws_cdk import aws_apigatewayv2 as apigwv2
from aws_cdk import aws_applicationautoscaling as appscaling
from aws_cdk import aws_cloudwatch as cloudwatch
from aws_cdk import aws_ec2 as ec2
from aws_cdk import aws_ecr as ecr
from aws_cdk import aws_ecs as ecs
from aws_cdk import aws_iam as iam
from aws_cdk import aws_secretsmanager as secretsmanager
from aws_cdk import aws_servicediscovery as servicediscovery
from constructs import Construct

from csm_infra.capacity import LIFECYCLE_ATTRIBUTE, ON_DEMAND, GpuCapacity
from csm_infra.config import Settings
from csm_infra.drain import DrainNotices
from csm_infra.nag import acknowledge
from csm_infra.ray_task import Mounts, RayNodeTask, ray_task_role
from csm_infra.tokens import ClusterTokens
from csm_infra.weights_task import WeightsDownloadTask

NAMESPACE = "csm.internal"
HEAD_NAME = "ray-head"
SERVE_PORT = 8000
SERVE_URL = f"http://{HEAD_NAME}.{NAMESPACE}:{SERVE_PORT}"
METRICS_NAMESPACE = "CSM/Serve"  # serve_app/cloudwatch_metrics.py publishes here
CLUSTER_NAME = "csm-voice"
# Worker scaling on OngoingRequestsPerNode (generator requests in flight per Ray node; a node's engine
# has 16 slots): add a worker past 10, two past 14, remove one below 3.
SCALE_OUT_AT = 10
SCALE_OUT_FAST_AT = 14
SCALE_IN_BELOW = 3


@dataclass(frozen=True)
class BridgeLink:
    """What the cluster takes from the API stack (`ApiStack.bridge_link()`)."""

    api_token: secretsmanager.ISecret
    bridge_token: secretsmanager.ISecret
    stage: apigwv2.WebSocketStage
    bridge_security_group: ec2.ISecurityGroup


def load_metric(name: str, statistic: str = "Average") -> cloudwatch.Metric:
    """One of the metrics `serve_app/cloudwatch_metrics.py` publishes for this cluster."""
    return cloudwatch.Metric(
        namespace=METRICS_NAMESPACE,
        metric_name=name,
        dimensions_map={"ClusterName": CLUSTER_NAME},
        statistic=statistic,
        period=Duration.minutes(1),
    )


class ClusterStack(Stack):
    def __init__(
        self,
        scope: Construct,
        construct_id: str,
        *,
        settings: Settings,
        vpc: ec2.IVpc,
        mounts: Mounts,
        file_system_security_group: ec2.ISecurityGroup,
        repository: ecr.IRepository,
        bridge: BridgeLink,
        **kwargs,
    ) -> None:
        super().__init__(scope, construct_id, **kwargs)
        self.cluster = ecs.Cluster(
            self,
            "Cluster",
            cluster_name=CLUSTER_NAME,
            vpc=vpc,
            container_insights_v2=ecs.ContainerInsights.ENABLED,
            default_cloud_map_namespace=ecs.CloudMapNamespaceOptions(
                name=NAMESPACE, type=servicediscovery.NamespaceType.DNS_PRIVATE, vpc=vpc
            ),
        )
        capacity = GpuCapacity(self, "GpuCapacity", settings=settings, vpc=vpc)
        self.cluster.add_asg_capacity_provider(capacity.capacity_provider)
        self.capacity = capacity
        self._acknowledge_instance_role(capacity)

        self.security_group = self._ray_security_group(vpc)
        # The EFS security group lives in the storage stack; the rule that admits Ray lives here, so
        # the storage stack does not depend on this one.
        efs_group = ec2.SecurityGroup.from_security_group_id(
            self, "FileSystemSecurityGroup", file_system_security_group.security_group_id, mutable=True
        )
        efs_group.add_ingress_rule(self.security_group, ec2.Port.tcp(2049), "NFS from the Ray nodes")
        self.security_group.add_ingress_rule(
            bridge.bridge_security_group, ec2.Port.tcp(SERVE_PORT), "Serve HTTP from the bridge"
        )

        tokens = ClusterTokens(self, "Tokens")
        self.head_role = ray_task_role(self, "HeadTaskRole", mounts, METRICS_NAMESPACE)
        self.worker_role = ray_task_role(self, "WorkerTaskRole", mounts, METRICS_NAMESPACE)
        for role in (self.head_role, self.worker_role):
            self._grant_callbacks(role, bridge.stage)
        self.drain = DrainNotices(self, "DrainNotices")
        self.drain.grant_handler(self.head_role, self.cluster, CLUSTER_NAME)
        image = ecs.ContainerImage.from_ecr_repository(repository, settings.image_tag)
        common = {
            "AWS_REGION": self.region,
            "AWS_DEFAULT_REGION": self.region,  # boto3 reads this one (metrics, @connections, the drain)
            "MODEL_PATH": settings.model_path,
            "VOICES_DIR": "/weights/voices",
            "HISTORY_DIR": "/history",
            "CSM_DEVICE": "cuda",
            "HF_HUB_OFFLINE": "1",
            "RAY_AUTH_MODE": "token",
            # Where bridged replies go: this stage's @connections, and nowhere a request names.
            "CSM_BRIDGE_CALLBACK_URL": bridge.stage.callback_url,
        }
        secrets = {
            "CSM_TOKEN": bridge.api_token,
            "CSM_BRIDGE_TOKEN": bridge.bridge_token,
            "RAY_AUTH_TOKEN": tokens.ray_token,
        }
        head = RayNodeTask(
            self,
            "HeadTask",
            role="head",
            image=image,
            task_role=self.head_role,
            mounts=mounts,
            environment={
                **common,
                "CSM_METRICS_NAMESPACE": METRICS_NAMESPACE,
                "CSM_CLUSTER_NAME": CLUSTER_NAME,
                "CSM_DRAIN_QUEUE_URL": self.drain.queue.queue_url,
            },
            secrets=secrets,
        )
        worker = RayNodeTask(
            self,
            "WorkerTask",
            role="worker",
            image=image,
            task_role=self.worker_role,
            mounts=mounts,
            environment={**common, "CSM_RAY_HEAD": f"{HEAD_NAME}.{NAMESPACE}"},
            secrets=secrets,
        )
        # What the head and worker services share: placement, network, deployment safety, tagging.
        shared = dict(
            cluster=self.cluster,
            circuit_breaker=ecs.DeploymentCircuitBreaker(enable=True, rollback=True),
            capacity_provider_strategies=[
                ecs.CapacityProviderStrategy(
                    capacity_provider=capacity.capacity_provider.capacity_provider_name, weight=1
                )
            ],
            security_groups=[self.security_group],
            vpc_subnets=ec2.SubnetSelection(subnet_type=ec2.SubnetType.PRIVATE_WITH_EGRESS),
            enable_ecs_managed_tags=True,
            propagate_tags=ecs.PropagatedTagSource.SERVICE,
        )
        self.head_service = ecs.Ec2Service(
            self,
            "HeadService",
            task_definition=head.task_definition,
            service_name="ray-head",
            desired_count=1,
            min_healthy_percent=0,
            max_healthy_percent=100,
            # Never on Spot: losing the head (GCS, Serve's controller) restarts the whole cluster.
            placement_constraints=[
                ecs.PlacementConstraint.member_of(f"attribute:{LIFECYCLE_ATTRIBUTE} == {ON_DEMAND}")
            ],
            cloud_map_options=ecs.CloudMapOptions(
                name=HEAD_NAME, dns_record_type=servicediscovery.DnsRecordType.A, dns_ttl=Duration.seconds(10)
            ),
            **shared,
        )
        self.worker_service = ecs.Ec2Service(
            self,
            "WorkerService",
            task_definition=worker.task_definition,
            service_name="ray-worker",
            desired_count=settings.min_nodes - 1,
            min_healthy_percent=50,
            max_healthy_percent=200,
            **shared,
        )
        self.worker_service.node.add_dependency(self.head_service)
        if settings.max_nodes > 1:
            self._scale_workers(settings)

        self.weights_task = WeightsDownloadTask(
            self,
            "WeightsDownload",
            image=image,
            mounts=mounts,
            hf_repo=settings.hf_repo,
            model_path=settings.model_path,
        )
        CfnOutput(self, "ClusterName", value=self.cluster.cluster_name)
        CfnOutput(self, "CapacityProviderName", value=capacity.capacity_provider.capacity_provider_name)
        CfnOutput(self, "WeightsTaskDefinition", value=self.weights_task.task_definition.family)
        CfnOutput(self, "HfTokenSecretArn", value=self.weights_task.hf_token.secret_arn)
        CfnOutput(self, "RaySecurityGroupId", value=self.security_group.security_group_id)
        CfnOutput(self, "DrainQueueUrl", value=self.drain.queue.queue_url)

    def _grant_callbacks(self, role: iam.IRole, stage: apigwv2.WebSocketStage) -> None:
        """The Serve ingress posts each conversation's events to `@connections` of the API's stage, and
        of no other stage or API."""
        stage.grant_management_api_access(role)
        # cdk-nag names the API by its import here: the export CDK makes for the API's id, which
        # `export_value` returns (the same one), so the acknowledgment covers this stage's connections only.
        api_id = self.resolve(Stack.of(stage).export_value(stage.api.api_id))["Fn::ImportValue"]
        acknowledge(
            role,
            f"AwsSolutions-IAM5[Resource::arn:{self.partition}:execute-api:{self.region}:<AWS::AccountId>:"
            f"{api_id}/{stage.stage_name}/*/@connections/*]",
            "Connection ids are only known at run time; the grant is limited to the API's one stage.",
        )

    def _ray_security_group(self, vpc: ec2.IVpc) -> ec2.SecurityGroup:
        """Ray's ports among the Ray tasks only; the one other way in, Serve's HTTP port from the bridge
        Lambdas' security group, is added next to it."""
        group = ec2.SecurityGroup(
            self,
            "RaySecurityGroup",
            vpc=vpc,
            description="Ray nodes: Ray ports among themselves; Serve HTTP port from the bridge only",
            allow_all_outbound=True,
        )
        group.add_ingress_rule(group, ec2.Port.all_tcp(), "Ray: GCS, raylets, object transfer, workers")
        return group

    def _scale_workers(self, settings: Settings) -> None:
        scaling = self.worker_service.auto_scale_task_count(
            min_capacity=settings.min_nodes - 1, max_capacity=settings.max_nodes - 1
        )
        scaling.scale_on_metric(
            "ScaleOnLoad",
            metric=load_metric("OngoingRequestsPerNode"),
            scaling_steps=[
                appscaling.ScalingInterval(upper=SCALE_IN_BELOW, change=-1),
                appscaling.ScalingInterval(lower=SCALE_OUT_AT, change=+1),
                appscaling.ScalingInterval(lower=SCALE_OUT_FAST_AT, change=+2),
            ],
            adjustment_type=appscaling.AdjustmentType.CHANGE_IN_CAPACITY,
            evaluation_periods=3,
            datapoints_to_alarm=2,
            # A new worker needs minutes (instance, image, weights): do not add another meanwhile.
            cooldown=Duration.minutes(10),
        )

    def _acknowledge_instance_role(self, capacity: GpuCapacity) -> None:
        reason = (
            "The statements CDK adds for the ECS agent (register the instance, poll for tasks, submit "
            "state changes, get an ECR login token): the ECS agent's documented permissions, whose "
            "actions take no resource or span the agent's own submissions."
        )
        for finding in ("Resource::*", "Action::ecs:Submit*"):
            acknowledge(capacity.role, f"AwsSolutions-IAM5[{finding}]", reason)
