"""GPU capacity: an Auto Scaling group of GPU instances serving the ECS cluster as a capacity provider.

The instances run the ECS GPU-optimized Amazon Linux 2023 AMI (its NVIDIA driver, 580 series, is what
the image's CUDA 13 torch needs), resolved from AWS's public SSM parameter at deploy time, so `cdk synth`
makes no lookup and each deploy picks up the current AMI. Instance metadata needs IMDSv2 tokens and is
out of reach of containers (hop limit 1, and the ECS agent blocks it for awsvpc tasks). The root volume
is encrypted gp3. No SSH key and no inbound rule: Session Manager reaches an instance if one must.

ECS scales the group through managed scaling: a worker task that finds no free GPU is what adds an
instance, and a drained, empty instance is what removes one (managed termination protection keeps ECS
from taking away an instance that still runs a task).

Spot: the first `on_demand_nodes` instances are on-demand, every one above them Spot (price-capacity
optimized over the `instance_types` pools). Each instance records its purchase option as the ECS
attribute `csm.lifecycle` (`on-demand` or `spot`), and the Ray head is placed on `on-demand` only. A Spot
instance that gets an interruption notice or a rebalance recommendation is drained three ways: the Ray
head's drain handler hears of it first (csm_infra/drain.py: EventBridge to SQS) and drains the Ray node;
the ECS agent sets the instance DRAINING on an interruption notice (`ECS_ENABLE_SPOT_INSTANCE_DRAINING`);
and Capacity Rebalancing launches a replacement, then terminates the old instance through ECS managed
draining (the group's lifecycle hook waits for its tasks to stop).
"""

from __future__ import annotations

from aws_cdk import Duration
from aws_cdk import aws_autoscaling as autoscaling
from aws_cdk import aws_ec2 as ec2
from aws_cdk import aws_ecs as ecs
from aws_cdk import aws_iam as iam
from constructs import Construct

from csm_infra.config import Settings
from csm_infra.nag import acknowledge

# The ECS agent's settings, added to the user data that joins the cluster.
AGENT_CONFIG = {
    "ECS_AWSVPC_BLOCK_IMDS": "true",  # tasks use their task role, never the instance's
    "ECS_IMAGE_PULL_BEHAVIOR": "prefer-cached",  # tags are immutable; a restart need not pull 10 GB
    "ECS_ENABLE_GPU_SUPPORT": "true",
    "ECS_ENABLE_SPOT_INSTANCE_DRAINING": "true",  # a Spot interruption notice sets the instance DRAINING
}
# The ECS attribute that says whether an instance is on-demand or Spot (the head's placement constraint).
LIFECYCLE_ATTRIBUTE = "csm.lifecycle"
ON_DEMAND = "on-demand"
ECS_CONFIG = "/etc/ecs/ecs.config"
IMDS = "http://169.254.169.254/latest"


def lifecycle_commands(ecs_config: str = ECS_CONFIG) -> list[str]:
    """User data that writes the instance's purchase option into the ECS agent's config as the custom
    attribute `csm.lifecycle`. It runs on the host, where IMDSv2 answers (tasks cannot reach it). Anything
    but "on-demand" counts as Spot, so a failed lookup keeps the head off the instance rather than on Spot."""
    return [
        f'IMDS_TOKEN=$(curl -sf --retry 5 -X PUT "{IMDS}/api/token" '
        '-H "X-aws-ec2-metadata-token-ttl-seconds: 60")',
        f'LIFECYCLE=$(curl -sf --retry 5 -H "X-aws-ec2-metadata-token: $IMDS_TOKEN" '
        f'"{IMDS}/meta-data/instance-life-cycle")',
        f'[ "$LIFECYCLE" = {ON_DEMAND} ] || LIFECYCLE=spot',
        f'echo "ECS_INSTANCE_ATTRIBUTES={{\\"{LIFECYCLE_ATTRIBUTE}\\":\\"$LIFECYCLE\\"}}" >> {ecs_config}',
    ]


class GpuCapacity(Construct):
    def __init__(self, scope: Construct, construct_id: str, *, settings: Settings, vpc: ec2.IVpc) -> None:
        super().__init__(scope, construct_id)
        self.security_group = ec2.SecurityGroup(
            self,
            "InstanceSecurityGroup",
            vpc=vpc,
            description="GPU instances: no inbound; tasks have their own ENIs and security group",
            allow_all_outbound=True,
        )
        self.role = iam.Role(
            self,
            "InstanceRole",
            assumed_by=iam.ServicePrincipal("ec2.amazonaws.com"),
            managed_policies=[iam.ManagedPolicy.from_aws_managed_policy_name("AmazonSSMManagedInstanceCore")],
        )
        acknowledge(
            self.role,
            "AwsSolutions-IAM4[Policy::arn:<AWS::Partition>:iam::aws:policy/AmazonSSMManagedInstanceCore]",
            "Session Manager access instead of SSH (no key, no open port, every session audited); the "
            "AWS managed policy is the one Systems Manager documents for it.",
        )
        user_data = ec2.UserData.for_linux()
        user_data.add_commands(*(f"echo {k}={v} >> {ECS_CONFIG}" for k, v in AGENT_CONFIG.items()))
        user_data.add_commands(*lifecycle_commands())
        # No instance type here: the group's overrides name them (settings.instance_types).
        self.launch_template = ec2.LaunchTemplate(
            self,
            "LaunchTemplate",
            machine_image=ecs.EcsOptimizedImage.amazon_linux2023(ecs.AmiHardwareType.GPU),
            require_imdsv2=True,
            http_put_response_hop_limit=1,
            detailed_monitoring=True,
            ebs_optimized=True,
            role=self.role,
            security_group=self.security_group,
            user_data=user_data,
            block_devices=[
                ec2.BlockDevice(
                    device_name="/dev/xvda",
                    volume=ec2.BlockDeviceVolume.ebs(
                        settings.root_volume_gib,
                        encrypted=True,
                        volume_type=ec2.EbsDeviceVolumeType.GP3,
                        delete_on_termination=True,
                    ),
                )
            ],
        )
        self.group = autoscaling.AutoScalingGroup(
            self,
            "Group",
            vpc=vpc,
            vpc_subnets=ec2.SubnetSelection(subnet_type=ec2.SubnetType.PRIVATE_WITH_EGRESS),
            mixed_instances_policy=autoscaling.MixedInstancesPolicy(
                launch_template=self.launch_template,
                launch_template_overrides=[
                    autoscaling.LaunchTemplateOverrides(instance_type=ec2.InstanceType(name))
                    for name in settings.instance_types
                ],
                instances_distribution=autoscaling.InstancesDistribution(
                    on_demand_base_capacity=settings.on_demand_nodes,
                    on_demand_percentage_above_base_capacity=0,
                    on_demand_allocation_strategy=autoscaling.OnDemandAllocationStrategy.PRIORITIZED,
                    spot_allocation_strategy=autoscaling.SpotAllocationStrategy.PRICE_CAPACITY_OPTIMIZED,
                ),
            ),
            capacity_rebalance=True,
            min_capacity=settings.min_nodes,
            max_capacity=settings.max_nodes,
            new_instances_protected_from_scale_in=True,
            default_instance_warmup=Duration.minutes(5),
            group_metrics=[autoscaling.GroupMetrics.all()],
        )
        acknowledge(
            self.group,
            "AwsSolutions-AS3",
            "ECS managed scaling decides every scaling activity of this group; they show in the ECS "
            "capacity provider's events and in the running-task alarms, which notify the alarm topic.",
        )
        acknowledge(
            self.group,
            "AwsSolutions-EC26",
            "cdk-nag 3.0.2's EC26 reads only a group's own LaunchTemplate property and throws on a "
            "mixed-instances policy's; the launch template's one volume is encrypted gp3, which "
            "tests/test_infra_cdk.py asserts on the template.",
        )
        self.capacity_provider = ecs.AsgCapacityProvider(
            self,
            "CapacityProvider",
            auto_scaling_group=self.group,
            enable_managed_scaling=True,
            enable_managed_termination_protection=True,
            enable_managed_draining=True,
            target_capacity_percent=100,
        )
