"""The network: a VPC whose private subnets hold everything (GPU instances, EFS, the bridge Lambdas).

Nothing in it has a public address. The NAT gateway is how the private subnets reach AWS APIs: the
bridge Lambdas post to API Gateway's `@connections` endpoint and read Secrets Manager, the instances
pull the image from ECR and publish metrics. S3 goes through a gateway endpoint (free, and ECR's
image layers come from S3). Every flow is logged.
"""

from __future__ import annotations

from aws_cdk import CfnOutput, RemovalPolicy, Stack
from aws_cdk import aws_ec2 as ec2
from aws_cdk import aws_logs as logs
from constructs import Construct

from csm_infra.config import Settings


class NetworkStack(Stack):
    def __init__(self, scope: Construct, construct_id: str, *, settings: Settings, **kwargs) -> None:
        super().__init__(scope, construct_id, **kwargs)
        self.vpc = ec2.Vpc(
            self,
            "Vpc",
            ip_addresses=ec2.IpAddresses.cidr("10.40.0.0/16"),
            # Without account/region lookups the VPC spreads over the region's first two AZs
            # (Fn::GetAZs at deploy time); `availability_zones` pins them.
            max_azs=None if settings.availability_zones else 2,
            availability_zones=settings.availability_zones or None,
            nat_gateways=settings.nat_gateways,
            subnet_configuration=[
                ec2.SubnetConfiguration(name="public", subnet_type=ec2.SubnetType.PUBLIC, cidr_mask=24),
                ec2.SubnetConfiguration(
                    name="private", subnet_type=ec2.SubnetType.PRIVATE_WITH_EGRESS, cidr_mask=20
                ),
            ],
            gateway_endpoints={
                "S3": ec2.GatewayVpcEndpointOptions(service=ec2.GatewayVpcEndpointAwsService.S3)
            },
            restrict_default_security_group=True,
        )
        flow_logs = logs.LogGroup(
            self,
            "FlowLogs",
            retention=logs.RetentionDays.ONE_MONTH,
            removal_policy=RemovalPolicy.DESTROY,
        )
        self.vpc.add_flow_log(
            "FlowLog",
            destination=ec2.FlowLogDestination.to_cloud_watch_logs(flow_logs),
            traffic_type=ec2.FlowLogTrafficType.ALL,
        )
        self.private_subnets = ec2.SubnetSelection(subnet_type=ec2.SubnetType.PRIVATE_WITH_EGRESS)
        private = self.vpc.select_subnets(subnet_type=ec2.SubnetType.PRIVATE_WITH_EGRESS)
        CfnOutput(
            self, "PrivateSubnets", value=",".join(private.subnet_ids), description="for aws ecs run-task"
        )
