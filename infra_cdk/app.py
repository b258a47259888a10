#!/usr/bin/env python3
"""The CDK app: the AWS deployment of CSM voice conversations, composed from one stack per concern.

    browser ─► CloudFront + WAF (CsmFrontend: the distribution and its bucket; CsmPage: what is in it,
               the page and config.json with the endpoint and, with Cognito, where to sign in)
    browser ─► Cognito's managed login (CsmAuth, only with `-c cognito=true`)
    browser ─► API Gateway WebSocket (CsmApi) ─► bridge Lambdas ─► Serve ingress on the Ray head
    Ray head + GPU workers on ECS (CsmCluster), EFS weights + history (CsmStorage), in a VPC (CsmNetwork)
    the image in ECR (CsmRegistry); alarms and a dashboard (CsmMonitoring)

Deploy order (what each takes from the ones before it):
    CsmRegistry, CsmNetwork, CsmStorage
    CsmFrontend   the page's address
    CsmAuth       the app client returns to that address
    CsmApi        the authorizer accepts the client's tokens
    CsmCluster    the ingress posts replies to the API's @connections URL
    CsmPage       config.json names the API's endpoint and the client
    CsmMonitoring alarms on the API and the cluster

Settings are context values with defaults (csm_infra/config.py, cdk.json); the README says how to deploy.
`cdk synth` needs no AWS account: there are no lookups, and cdk-nag's AwsSolutions checks run in it.
"""

from __future__ import annotations

import aws_cdk as cdk
from csm_infra.api import ApiStack
from csm_infra.auth import AuthStack
from csm_infra.cluster import SERVE_URL, ClusterStack
from csm_infra.config import Settings
from csm_infra.frontend import FrontendStack
from csm_infra.monitoring import MonitoringStack
from csm_infra.nag import add_checks
from csm_infra.network import NetworkStack
from csm_infra.page import PageStack
from csm_infra.ray_task import Mounts
from csm_infra.registry import RegistryStack
from csm_infra.storage import StorageStack

# CloudFront's certificates and web ACLs must be in us-east-1, so the page's stacks are there.
CLOUDFRONT_REGION = "us-east-1"


def compose(app: cdk.App) -> dict[str, cdk.Stack]:
    """Every stack of the deployment, by name, wired together."""
    settings = Settings.from_context(app.node)
    env = cdk.Environment(region=settings.region)
    page_env = cdk.Environment(region=CLOUDFRONT_REGION)
    # A stack that takes a value from a stack in another region reads it through CDK's cross-region
    # references (SSM parameters written by the producer's stack).
    crosses = settings.region != CLOUDFRONT_REGION
    registry = RegistryStack(app, "CsmRegistry", settings=settings, env=env)
    network = NetworkStack(app, "CsmNetwork", settings=settings, env=env)
    storage = StorageStack(app, "CsmStorage", vpc=network.vpc, env=env)
    frontend = FrontendStack(app, "CsmFrontend", settings=settings, env=page_env)
    auth = (
        AuthStack(
            app,
            "CsmAuth",
            settings=settings,
            page_url=frontend.page_url,
            env=env,
            cross_region_references=crosses,
        )
        if settings.cognito
        else None
    )
    sign_in = auth.sign_in if auth else None
    api = ApiStack(
        app, "CsmApi", settings=settings, vpc=network.vpc, serve_url=SERVE_URL, sign_in=sign_in, env=env
    )
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
    page = PageStack(
        app,
        "CsmPage",
        settings=settings,
        bucket=frontend.bucket,
        distribution=frontend.distribution,
        endpoint=api.stage.url,
        sign_in=sign_in,
        env=page_env,
        cross_region_references=crosses,
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
        drain_dead_letters=cluster.drain.dead_letters,
        env=env,
    )
    stacks = [registry, network, storage, frontend, *([auth] if auth else []), api, cluster, page, monitoring]
    for stack in stacks:
        cdk.Tags.of(stack).add("project", "csm-voice")
    add_checks(app)
    return {stack.stack_name: stack for stack in stacks}


if __name__ == "__main__":
    app = cdk.App()
    compose(app)
    app.synth()
