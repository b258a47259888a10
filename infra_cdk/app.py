#!/usr/bin/env python3
"""The CDK app: the AWS deployment of CSM voice conversations, composed from one stack per concern.

    browser ─► CloudFront + WAF (CsmFrontend: the page, config.json with the endpoint)
    browser ─► API Gateway WebSocket (CsmApi) ─► bridge Lambdas ─► Serve ingress on the Ray head
    Ray head + GPU workers on ECS (CsmCluster), EFS weights + history (CsmStorage), in a VPC (CsmNetwork)
    (deploy order: the API comes before the cluster, whose ingress is configured with its @connections URL)
    the image in ECR (CsmRegistry); alarms and a dashboard (CsmMonitoring)

Settings are context values with defaults (csm_infra/config.py, cdk.json); the README says how to deploy.
`cdk synth` needs no AWS account: there are no lookups, and cdk-nag's AwsSolutions checks run in it.
"""

from __future__ import annotations

import aws_cdk as cdk
from csm_infra.api import ApiStack
from csm_infra.cluster import SERVE_URL, ClusterStack
from csm_infra.config import Settings
from csm_infra.frontend import FrontendStack
from csm_infra.monitoring import MonitoringStack
from csm_infra.nag import add_checks
from csm_infra.network import NetworkStack
from csm_infra.ray_task import Mounts
from csm_infra.registry import RegistryStack
from csm_infra.storage import StorageStack

# CloudFront's certificates and web ACLs must be in us-east-1, so the page's stack is there.
CLOUDFRONT_REGION = "us-east-1"


def compose(app: cdk.App) -> dict[str, cdk.Stack]:
    """Every stack of the deployment, by name, wired together."""
    settings = Settings.from_context(app.node)
    env = cdk.Environment(region=settings.region)
    registry = RegistryStack(app, "CsmRegistry", settings=settings, env=env)
    network = NetworkStack(app, "CsmNetwork", settings=settings, env=env)
    storage = StorageStack(app, "CsmStorage", vpc=network.vpc, env=env)
    api = ApiStack(app, "CsmApi", settings=settings, vpc=network.vpc, serve_url=SERVE_URL, env=env)
    cluster = ClusterStack(
        app,
        "CsmCluster",
        settings=settings,
        vpc=network.vpc,
        mounts=Mounts(storage.file_system, storage.weights, storage.history),
        file_system_security_group=storage.file_system.connections.security_groups[0],
        repository=registry.repository,
        bridge=api.bridge_link(),
        env=env,
    )
    frontend = FrontendStack(
        app,
        "CsmFrontend",
        settings=settings,
        api_endpoint=api.stage.url,
        env=cdk.Environment(region=CLOUDFRONT_REGION),
        cross_region_references=settings.region != CLOUDFRONT_REGION,
    )
    monitoring = MonitoringStack(
        app,
        "CsmMonitoring",
        settings=settings,
        api=api.api,
        stage=api.stage,
        functions=api.functions,
        head_service=cluster.head_service,
        worker_service=cluster.worker_service,
        env=env,
    )
    stacks = [registry, network, storage, api, cluster, frontend, monitoring]
    for stack in stacks:
        cdk.Tags.of(stack).add("project", "csm-voice")
    add_checks(app)
    return {stack.stack_name: stack for stack in stacks}


if __name__ == "__main__":
    app = cdk.App()
    compose(app)
    app.synth()
