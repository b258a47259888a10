"""The CDK app (infra_cdk/): synthesized once for the module, offline and without AWS credentials,
then one test per concern on the templates (`aws_cdk.assertions.Template`), cdk-nag's AwsSolutions
checks and cfn-lint over every template.

`cdk synth` itself (the CLI from infra_cdk/node_modules, or `python app.py` as the CLI would run it
when the CLI is not installed) runs in a subprocess with no credentials and no AWS configuration, in
parallel with the in-process synthesis the assertions use.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import pytest

os.environ.setdefault("JSII_SILENCE_WARNING_END_OF_LIFE_NODE_VERSION", "20")  # before jsii starts node

import aws_cdk as cdk
from aws_cdk.assertions import Match, Template

ROOT = Path(__file__).resolve().parents[1]
INFRA = ROOT / "infra_cdk"
CDK_CLI = INFRA / "node_modules" / ".bin" / "cdk"
STACKS = ("CsmRegistry", "CsmNetwork", "CsmStorage", "CsmApi", "CsmCluster", "CsmFrontend", "CsmMonitoring")
GPU_AMI_PARAMETER = "/aws/service/ecs/optimized-ami/amazon-linux-2023/gpu/recommended/image_id"

sys.path.insert(0, str(INFRA))  # the app's own layout: `python3 app.py` runs from infra_cdk/
from csm_infra.config import Settings, defaults  # noqa: E402


def load_app_module() -> ModuleType:
    spec = importlib.util.spec_from_file_location("csm_infra_app", INFRA / "app.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def cdk_json_context() -> dict:
    return json.loads((INFRA / "cdk.json").read_text())["context"]


def offline_env(home: Path) -> dict[str, str]:
    """No credentials, no AWS configuration, no instance metadata: nothing to look anything up with."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "CDK_"))}
    env.update(
        HOME=str(home),
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        AWS_CONFIG_FILE=str(home / "no-config"),
        AWS_SHARED_CREDENTIALS_FILE=str(home / "no-credentials"),
        AWS_EC2_METADATA_DISABLED="true",
        CDK_DISABLE_CLI_TELEMETRY="true",
        JSII_SILENCE_WARNING_END_OF_LIFE_NODE_VERSION="20",
    )
    return env


def start_cli_synth(out: Path, page: Path, home: Path) -> subprocess.Popen:
    """`cdk synth` as an engineer runs it; `python app.py` (what the CLI runs) when the CLI is absent."""
    if CDK_CLI.exists():
        args = [str(CDK_CLI), "synth", "--quiet", "--no-notices", "--no-version-reporting", "-o", str(out)]
        args += ["-c", f"frontend_dist={page}"]
        env = offline_env(home)
    else:
        args = [sys.executable, "app.py"]
        env = offline_env(home) | {
            "CDK_OUTDIR": str(out),
            "CDK_CONTEXT_JSON": json.dumps(cdk_json_context() | {"frontend_dist": str(page)}),
        }
    return subprocess.Popen(args, cwd=INFRA, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


@dataclass
class Synthesized:
    app: cdk.App
    stacks: dict[str, cdk.Stack]
    templates: dict[str, Template]
    outdir: Path
    cli_out: Path
    cli_returncode: int
    cli_output: str

    def resources(self, type_: str) -> list[tuple[str, str, dict]]:
        """(stack, logical id, resource) of every resource of a type, in every stack."""
        found = []
        for name, template in self.templates.items():
            for logical_id, resource in template.find_resources(type_).items():
                found.append((name, logical_id, resource))
        return found


@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> Synthesized:
    work = tmp_path_factory.mktemp("cdk")
    page = work / "page"
    (page / "assets").mkdir(parents=True)
    (page / "index.html").write_text('<!doctype html><script src="/assets/app.js"></script>')
    (page / "assets" / "app.js").write_text("console.log('page')")
    home = work / "home"
    home.mkdir()
    cli = start_cli_synth(work / "cli.out", page, home)
    try:
        app = cdk.App(context=cdk_json_context() | {"frontend_dist": str(page)}, outdir=str(work / "app.out"))
        stacks = load_app_module().compose(app)
        app.synth()  # cdk-nag runs here: an unacknowledged finding fails the synthesis
        templates = {name: Template.from_stack(stack) for name, stack in stacks.items()}
        output, _ = cli.communicate(timeout=300)
    finally:
        if cli.poll() is None:
            cli.kill()
    return Synthesized(
        app,
        stacks,
        templates,
        work / "app.out",
        work / "cli.out",
        cli.returncode,
        output.decode(errors="replace"),
    )


# ---- done-when 1: offline synthesis ----------------------------------------------------------------------
def test_cdk_synth_runs_offline_without_credentials(synth):
    assert synth.cli_returncode == 0, synth.cli_output[-5000:]
    manifest = json.loads((synth.cli_out / "manifest.json").read_text())
    assert "missing" not in manifest, f"context lookups: {manifest.get('missing')}"
    for name in STACKS:
        assert (synth.cli_out / f"{name}.template.json").is_file()
    assert set(synth.stacks) == set(STACKS)


def test_context_values_have_documented_defaults():
    context = cdk_json_context()
    for name, value in defaults().items():
        assert context[name] == value, f"cdk.json documents {name}={context[name]!r}, the code uses {value!r}"
    app = cdk.App(context={"max_nodes": "5", "availability_zones": "us-east-1a,us-east-1b"})
    settings = Settings.from_context(app.node)
    assert settings.max_nodes == 5 and settings.availability_zones == ["us-east-1a", "us-east-1b"]
    with pytest.raises(ValueError, match="min_nodes"):
        Settings.from_context(cdk.App(context={"min_nodes": 3, "max_nodes": 2}).node)
    with pytest.raises(ValueError, match="certificate_arn"):
        Settings.from_context(cdk.App(context={"domain_name": "voice.example.com"}).node)


# ---- done-when 2: one test per concern -------------------------------------------------------------------
def test_network_private_subnets_nat_and_flow_logs(synth):
    network = synth.templates["CsmNetwork"]
    network.resource_count_is("AWS::EC2::VPC", 1)
    network.resource_count_is("AWS::EC2::NatGateway", 1)
    network.has_resource_properties("AWS::EC2::FlowLog", {"ResourceType": "VPC", "TrafficType": "ALL"})
    network.has_resource_properties("AWS::EC2::Subnet", {"MapPublicIpOnLaunch": False})
    network.has_resource_properties("AWS::EC2::VPCEndpoint", {"VpcEndpointType": "Gateway"})


def test_storage_efs_encrypted_with_two_access_points_and_tls_only(synth):
    storage = synth.templates["CsmStorage"]
    storage.has_resource_properties(
        "AWS::EFS::FileSystem",
        {
            "Encrypted": True,
            "KmsKeyId": Match.any_value(),
            "BackupPolicy": {"Status": "ENABLED"},
            "FileSystemPolicy": Match.object_like(
                {
                    "Statement": Match.array_with(
                        [
                            Match.object_like(
                                {"Effect": "Deny", "Condition": {"Bool": {"aws:SecureTransport": "false"}}}
                            )
                        ]
                    )
                }
            ),
        },
    )
    storage.resource_count_is("AWS::EFS::AccessPoint", 2)
    for path in ("/weights", "/history"):
        storage.has_resource_properties(
            "AWS::EFS::AccessPoint",
            {"RootDirectory": Match.object_like({"Path": path}), "PosixUser": {"Uid": "1000", "Gid": "1000"}},
        )
    storage.has_resource_properties("AWS::KMS::Key", {"EnableKeyRotation": True})


def test_gpu_instances_use_the_gpu_ami_imdsv2_and_encrypted_ebs(synth):
    cluster = synth.templates["CsmCluster"]
    parameters = cluster.to_json()["Parameters"]
    ami = [p for p in parameters.values() if p.get("Default") == GPU_AMI_PARAMETER]
    assert ami and ami[0]["Type"] == "AWS::SSM::Parameter::Value<AWS::EC2::Image::Id>"
    cluster.has_resource_properties(
        "AWS::EC2::LaunchTemplate",
        {
            "LaunchTemplateData": Match.object_like(
                {
                    "InstanceType": "g4dn.xlarge",
                    "ImageId": {"Ref": Match.string_like_regexp("gpurecommendedimageid")},
                    "MetadataOptions": {"HttpTokens": "required", "HttpPutResponseHopLimit": 1},
                    "BlockDeviceMappings": [
                        {
                            "DeviceName": "/dev/xvda",
                            "Ebs": Match.object_like({"Encrypted": True, "VolumeType": "gp3"}),
                        }
                    ],
                }
            )
        },
    )
    cluster.has_resource_properties(
        "AWS::AutoScaling::AutoScalingGroup",
        {"MinSize": "1", "MaxSize": "3", "NewInstancesProtectedFromScaleIn": True},
    )
    cluster.has_resource_properties(
        "AWS::ECS::CapacityProvider",
        {
            "AutoScalingGroupProvider": Match.object_like(
                {
                    "ManagedScaling": Match.object_like({"Status": "ENABLED"}),
                    "ManagedTerminationProtection": "ENABLED",
                }
            )
        },
    )
    cluster.has_resource_properties(
        "AWS::ECS::Cluster", {"ClusterSettings": [{"Name": "containerInsights", "Value": "enabled"}]}
    )


def test_gpu_task_definitions_require_ec2_one_gpu_shm_and_efs_over_tls(synth):
    cluster = synth.templates["CsmCluster"]
    ray_tasks = {
        k: v
        for k, v in cluster.find_resources("AWS::ECS::TaskDefinition").items()
        if v["Properties"].get("Family") in ("csm-ray-head", "csm-ray-worker")
    }
    assert len(ray_tasks) == 2
    for task in ray_tasks.values():
        props = task["Properties"]
        assert props["RequiresCompatibilities"] == ["EC2"]
        assert props["NetworkMode"] == "awsvpc"
        (container,) = props["ContainerDefinitions"]
        assert container["ResourceRequirements"] == [{"Type": "GPU", "Value": "1"}]
        assert container["LinuxParameters"]["SharedMemorySize"] >= 2048
        assert container["LinuxParameters"]["Capabilities"] == {"Drop": ["ALL"]}
        assert container.get("Privileged") in (None, False)
        assert "HealthCheck" in container
        assert {m["ContainerPath"]: m["ReadOnly"] for m in container["MountPoints"]} == {
            "/weights": True,
            "/history": False,
        }
        assert {s["Name"] for s in container["Secrets"]} == {
            "CSM_TOKEN",
            "CSM_BRIDGE_TOKEN",
            "RAY_AUTH_TOKEN",
        }
        environment = {e["Name"]: e["Value"] for e in container["Environment"]}
        assert "CSM_BRIDGE_CALLBACK_URL" in environment  # test_the_bridge_has_a_token_and_a_callback_url
        assert environment["MODEL_PATH"] == "/weights/csm-1b" and environment["CSM_DEVICE"] == "cuda"
        assert not any("TOKEN" in name and name != "RAY_AUTH_MODE" for name in environment)
        for volume in props["Volumes"]:
            efs = volume["EFSVolumeConfiguration"]
            assert efs["TransitEncryption"] == "ENABLED"
            assert efs["AuthorizationConfig"]["IAM"] == "ENABLED"
    for _, _, task in synth.resources("AWS::ECS::TaskDefinition"):
        assert task["Properties"]["RequiresCompatibilities"] == ["EC2"]  # never Fargate: it has no GPUs


def test_ray_services_head_in_cloud_map_worker_joins_with_circuit_breakers(synth):
    cluster = synth.templates["CsmCluster"]
    cluster.resource_count_is("AWS::ECS::Service", 2)
    breaker = {"DeploymentCircuitBreaker": {"Enable": True, "Rollback": True}}
    cluster.has_resource_properties(
        "AWS::ECS::Service",
        {
            "ServiceName": "ray-head",
            "DesiredCount": 1,
            "ServiceRegistries": Match.any_value(),
            "DeploymentConfiguration": Match.object_like({**breaker, "MaximumPercent": 100}),
            "CapacityProviderStrategy": Match.any_value(),
        },
    )
    cluster.has_resource_properties(
        "AWS::ECS::Service",
        {"ServiceName": "ray-worker", "DeploymentConfiguration": Match.object_like(breaker)},
    )
    cluster.has_resource_properties(
        "AWS::ServiceDiscovery::Service",
        {"Name": "ray-head", "DnsConfig": Match.object_like({"DnsRecords": [{"Type": "A", "TTL": 10}]})},
    )
    cluster.has_resource_properties("AWS::ServiceDiscovery::PrivateDnsNamespace", {"Name": "csm.internal"})
    worker = next(
        v
        for v in cluster.find_resources("AWS::ECS::TaskDefinition").values()
        if v["Properties"]["Family"] == "csm-ray-worker"
    )
    environment = {
        e["Name"]: e["Value"] for e in worker["Properties"]["ContainerDefinitions"][0]["Environment"]
    }
    assert environment["CSM_RAY_HEAD"] == "ray-head.csm.internal"


def test_worker_service_scales_on_the_published_serve_load(synth):
    cluster = synth.templates["CsmCluster"]
    cluster.has_resource_properties(
        "AWS::ApplicationAutoScaling::ScalableTarget",
        {"MinCapacity": 0, "MaxCapacity": 2, "ScalableDimension": "ecs:service:DesiredCount"},
    )
    cluster.has_resource_properties(
        "AWS::ApplicationAutoScaling::ScalingPolicy", {"PolicyType": "StepScaling"}
    )
    cluster.has_resource_properties(
        "AWS::CloudWatch::Alarm",
        {
            "Namespace": "CSM/Serve",
            "MetricName": "OngoingRequestsPerNode",
            "Dimensions": [{"Name": "ClusterName", "Value": "csm-voice"}],
        },
    )
    head = next(
        v
        for v in cluster.find_resources("AWS::ECS::TaskDefinition").values()
        if v["Properties"]["Family"] == "csm-ray-head"
    )
    environment = {
        e["Name"]: e["Value"] for e in head["Properties"]["ContainerDefinitions"][0]["Environment"]
    }
    assert (
        environment["CSM_METRICS_NAMESPACE"] == "CSM/Serve" and environment["CSM_CLUSTER_NAME"] == "csm-voice"
    )
    cluster.has_resource_properties(
        "AWS::IAM::Policy",
        {
            "PolicyDocument": {
                "Statement": Match.array_with(
                    [
                        Match.object_like(
                            {
                                "Action": "cloudwatch:PutMetricData",
                                "Condition": {"StringEquals": {"cloudwatch:namespace": "CSM/Serve"}},
                            }
                        )
                    ]
                ),
                "Version": "2012-10-17",
            }
        },
    )


def _ingress_rules(synth) -> list[tuple[str, dict]]:
    rules = [(stack, r["Properties"]) for stack, _, r in synth.resources("AWS::EC2::SecurityGroupIngress")]
    for stack, logical_id, group in synth.resources("AWS::EC2::SecurityGroup"):
        for rule in group["Properties"].get("SecurityGroupIngress", []):
            rules.append((stack, {**rule, "GroupId": {"Fn::GetAtt": [logical_id, "GroupId"]}}))
    return rules


def _is_ray_group(group_id: object) -> bool:
    text = json.dumps(group_id)
    return "RaySecurityGroup" in text


def test_serve_port_is_open_only_to_the_bridge(synth):
    reaching_8000 = [
        (stack, rule)
        for stack, rule in _ingress_rules(synth)
        if _is_ray_group(rule["GroupId"]) and rule.get("FromPort", 0) <= 8000 <= rule.get("ToPort", 65535)
    ]
    sources = sorted(json.dumps(rule.get("SourceSecurityGroupId")) for _, rule in reaching_8000)
    assert len(reaching_8000) == 2, reaching_8000
    assert any("BridgeSecurityGroup" in s for s in sources)  # the bridge Lambdas
    assert any("RaySecurityGroup" in s for s in sources)  # the Ray nodes themselves
    for _, rule in _ingress_rules(synth):
        if _is_ray_group(rule["GroupId"]):
            assert "CidrIp" not in rule and "CidrIpv6" not in rule, rule
    # The GPU instances take no inbound traffic at all (the tasks have their own ENIs).
    instance_groups = [
        g
        for _, k, g in synth.resources("AWS::EC2::SecurityGroup")
        if k.startswith("GpuCapacityInstanceSecurityGroup")
    ]
    assert instance_groups and not instance_groups[0]["Properties"].get("SecurityGroupIngress")


def test_api_websocket_with_authorizer_on_connect_logs_and_throttling(synth):
    api = synth.templates["CsmApi"]
    api.has_resource_properties(
        "AWS::ApiGatewayV2::Api",
        {"ProtocolType": "WEBSOCKET", "RouteSelectionExpression": "$request.body.type"},
    )
    routes = {
        r["Properties"]["RouteKey"]: r["Properties"]
        for r in api.find_resources("AWS::ApiGatewayV2::Route").values()
    }
    assert set(routes) == {"$connect", "$default", "$disconnect"}
    assert routes["$connect"]["AuthorizationType"] == "CUSTOM"
    assert "AuthorizerId" in routes["$connect"]
    (authorizer,) = api.find_resources("AWS::ApiGatewayV2::Authorizer").values()
    assert authorizer["Properties"]["AuthorizerType"] == "REQUEST"
    assert "IdentitySource" not in authorizer["Properties"]  # ?token= or a header: both reach the authorizer
    api.has_resource_properties(
        "AWS::ApiGatewayV2::Stage",
        {
            "StageName": "prod",
            "AccessLogSettings": Match.object_like({"DestinationArn": Match.any_value()}),
            "DefaultRouteSettings": Match.object_like(
                {"ThrottlingRateLimit": 2000, "ThrottlingBurstLimit": 4000, "DetailedMetricsEnabled": True}
            ),
        },
    )
    functions = api.find_resources("AWS::Lambda::Function")
    handlers = {f["Properties"]["Handler"] for f in functions.values()}
    assert handlers == {
        "lambda_bridge.authorizer.handler",
        "lambda_bridge.handlers.connect",
        "lambda_bridge.handlers.default",
        "lambda_bridge.handlers.disconnect",
    }
    for function in functions.values():
        props = function["Properties"]
        assert props["Runtime"] == "python3.12"
        assert props["VpcConfig"]["SubnetIds"] and props["VpcConfig"]["SecurityGroupIds"]
        variables = props["Environment"]["Variables"]
        assert variables["SERVE_URL"] == "http://ray-head.csm.internal:8000"
        assert variables["AUTH_MODE"] == "authorizer"
        assert not {"TOKEN", "BRIDGE_TOKEN"} & set(variables)  # secrets by reference only
        # One secret each: the authorizer the users' token, the handlers the bridge's own.
        secret = (
            "TOKEN_SECRET_ARN"
            if props["Handler"].startswith("lambda_bridge.authorizer")
            else "BRIDGE_TOKEN_SECRET_ARN"
        )
        assert {name for name in variables if name.endswith("SECRET_ARN")} == {secret}


def test_lambda_asset_is_the_bridge_package_only(synth):
    api = synth.templates["CsmApi"]
    keys = {f["Properties"]["Code"]["S3Key"] for f in api.find_resources("AWS::Lambda::Function").values()}
    assert len(keys) == 1  # one asset for the four handlers
    asset = synth.outdir / ("asset." + keys.pop().removesuffix(".zip"))
    files = sorted(str(p.relative_to(asset)) for p in asset.rglob("*") if p.is_file())
    assert files == sorted(f"lambda_bridge/{p.name}" for p in (ROOT / "lambda_bridge").glob("*.py"))
    assert "lambda_bridge/handlers.py" in files


def _api_id_import(synth) -> dict:
    """How the cluster's stack refers to the WebSocket API's id (the API's stack is deployed first)."""
    api = synth.stacks["CsmApi"]
    return synth.stacks["CsmCluster"].resolve(api.export_value(api.api.api_id))


def test_manage_connections_is_granted_to_the_ray_task_role_for_the_stage_only(synth):
    grants = [
        (stack, policy["Properties"], statement)
        for stack, _, policy in synth.resources("AWS::IAM::Policy")
        for statement in policy["Properties"]["PolicyDocument"]["Statement"]
        if "execute-api:ManageConnections" in json.dumps(statement["Action"])
    ]
    assert len(grants) == 1
    stack, policy, statement = grants[0]
    assert stack == "CsmCluster"
    assert statement["Action"] == "execute-api:ManageConnections"
    parts = statement["Resource"]["Fn::Join"][1]
    assert _api_id_import(synth) in parts
    assert parts[-1] == "/prod/*/@connections/*"
    assert "RayTaskRole" in json.dumps(policy["Roles"])


def _secret_readers(synth, secret_id: str) -> set[str]:
    """Who may read a secret: the functions and tasks ("Connect", "Head") whose roles' policies name it."""
    readers = set()
    for _, _, policy in synth.resources("AWS::IAM::Policy"):
        for statement in policy["Properties"]["PolicyDocument"]["Statement"]:
            action, resource = json.dumps(statement["Action"]), json.dumps(statement["Resource"])
            if "secretsmanager:GetSecretValue" in action and secret_id in resource:
                roles = [role["Ref"] for role in policy["Properties"]["Roles"]]
                readers |= {re.sub(r"(Function|TaskTaskDefinition)\w*$", "", role) for role in roles}
    return readers


def test_the_bridge_has_a_token_and_a_callback_url_of_its_own(synth):
    """A second generated secret, the bridge's, read by the three handlers and the Ray tasks (the ingress
    checks it), not by the authorizer; the users' token read by the authorizer and the Ray tasks alone. The
    ingress posts replies to the stage's `@connections` URL, set in its environment, not per request."""
    secrets = synth.templates["CsmApi"].find_resources("AWS::SecretsManager::Secret")
    assert len(secrets) == 2 and all("GenerateSecretString" in s["Properties"] for s in secrets.values())
    (bridge_id,) = [k for k in secrets if k.startswith("TokensBridgeToken")]
    (users_id,) = [k for k in secrets if k.startswith("TokensApiToken")]
    assert _secret_readers(synth, bridge_id) == {"Connect", "Default", "Disconnect", "Head", "Worker"}
    assert _secret_readers(synth, users_id) == {"Authorizer", "Head", "Worker"}
    cluster = synth.templates["CsmCluster"]
    callback = {
        "Fn::Join": [
            "",
            [
                "https://",
                _api_id_import(synth),
                ".execute-api.us-east-1.",
                {"Ref": "AWS::URLSuffix"},
                "/prod",
            ],
        ]
    }
    for task in cluster.find_resources("AWS::ECS::TaskDefinition").values():
        if task["Properties"]["Family"] in ("csm-ray-head", "csm-ray-worker"):
            (container,) = task["Properties"]["ContainerDefinitions"]
            environment = {e["Name"]: e["Value"] for e in container["Environment"]}
            assert environment["CSM_BRIDGE_CALLBACK_URL"] == callback


def test_frontend_private_bucket_behind_cloudfront_oac_and_waf(synth):
    frontend = synth.templates["CsmFrontend"]
    assert synth.stacks["CsmFrontend"].region == "us-east-1"
    block_all = {
        "BlockPublicAcls": True,
        "BlockPublicPolicy": True,
        "IgnorePublicAcls": True,
        "RestrictPublicBuckets": True,
    }
    for bucket in frontend.find_resources("AWS::S3::Bucket").values():
        assert bucket["Properties"]["PublicAccessBlockConfiguration"] == block_all
    frontend.has_resource_properties(
        "AWS::S3::Bucket", {"LoggingConfiguration": Match.object_like({"LogFilePrefix": "s3/"})}
    )
    for policy in frontend.find_resources("AWS::S3::BucketPolicy").values():
        statements = policy["Properties"]["PolicyDocument"]["Statement"]
        assert any(
            s["Effect"] == "Deny" and s.get("Condition") == {"Bool": {"aws:SecureTransport": "false"}}
            for s in statements
        )
    frontend.has_resource_properties(
        "AWS::CloudFront::OriginAccessControl",
        {
            "OriginAccessControlConfig": Match.object_like(
                {"OriginAccessControlOriginType": "s3", "SigningBehavior": "always"}
            )
        },
    )
    frontend.has_resource_properties(
        "AWS::CloudFront::Distribution",
        {
            "DistributionConfig": Match.object_like(
                {
                    "Origins": [Match.object_like({"OriginAccessControlId": Match.any_value()})],
                    "WebACLId": Match.any_value(),
                    "DefaultCacheBehavior": Match.object_like({"ViewerProtocolPolicy": "redirect-to-https"}),
                    "Logging": Match.any_value(),
                }
            )
        },
    )
    page_policy = next(
        p for p in frontend.find_resources("AWS::S3::BucketPolicy").values() if "cloudfront" in json.dumps(p)
    )
    allowed = [s for s in page_policy["Properties"]["PolicyDocument"]["Statement"] if s["Effect"] == "Allow"]
    assert all(s["Principal"] != "*" and s["Principal"] != {"AWS": "*"} for s in allowed)
    readers = [s for s in allowed if "s3:GetObject" in json.dumps(s["Action"])]
    assert readers and all(s["Principal"] == {"Service": "cloudfront.amazonaws.com"} for s in readers)
    assert all("AWS:SourceArn" in s["Condition"]["StringEquals"] for s in readers)  # this distribution only
    frontend.has_resource_properties("AWS::WAFv2::WebACL", {"Scope": "CLOUDFRONT"})


def test_page_config_carries_the_endpoint_and_no_token(synth):
    frontend = synth.templates["CsmFrontend"]
    (deployment,) = frontend.find_resources("Custom::CDKBucketDeployment").values()
    markers = json.dumps(deployment["Properties"].get("SourceMarkers"))
    assert (
        "wss://" in markers and "WebSocketApi" in markers and "/prod" in markers
    )  # filled in at deploy time
    configs = [p for p in synth.outdir.rglob("config.json")]
    assert len(configs) == 1
    # The deployment puts the quoted URL where the marker is; the page's config has nothing else.
    config = json.loads(re.sub(r"<<marker:0x[0-9a-f]+:\d+>>", '"wss://api/prod"', configs[0].read_text()))
    assert config == {"endpoint": "wss://api/prod"}


def test_alarms_for_every_signal_go_to_the_topic(synth):
    monitoring = synth.templates["CsmMonitoring"]
    alarms = monitoring.find_resources("AWS::CloudWatch::Alarm").values()

    def metrics_of(alarm: dict) -> list[tuple[str, str]]:
        props = alarm["Properties"]
        if "MetricName" in props:
            return [(props["Namespace"], props["MetricName"])]
        return [
            (m["MetricStat"]["Metric"]["Namespace"], m["MetricStat"]["Metric"]["MetricName"])
            for m in props.get("Metrics", [])
            if "MetricStat" in m
        ]

    watched = [m for alarm in alarms for m in metrics_of(alarm)]
    for signal in (
        ("AWS/ApiGateway", "ExecutionError"),
        ("AWS/ApiGateway", "IntegrationError"),
        ("ECS/ContainerInsights", "RunningTaskCount"),
        ("CSM/Serve", "GpuUtilization"),
        ("CSM/Serve", "QueuedRequests"),
    ):
        assert signal in watched, signal
    assert watched.count(("AWS/Lambda", "Errors")) == 4
    assert watched.count(("AWS/Lambda", "Throttles")) == 4
    topic = next(iter(monitoring.find_resources("AWS::SNS::Topic")))
    for alarm in alarms:
        assert alarm["Properties"]["AlarmActions"] == [{"Ref": topic}]
    monitoring.has_resource_properties("AWS::SNS::Topic", {"KmsMasterKeyId": Match.any_value()})
    monitoring.resource_count_is("AWS::CloudWatch::Dashboard", 1)


# ---- done-when 3: cdk-nag and cfn-lint ---------------------------------------------------------------------
def test_cdk_nag_aws_solutions_has_no_unacknowledged_finding(synth):
    from cdk_nag import AwsSolutionsChecks

    report = AwsSolutionsChecks().validate_scope(synth.app)
    assert report.success, [
        (v.rule_name, [c.construct_path for c in v.violating_constructs]) for v in report.violations
    ]
    assert not report.violations
    acknowledged = {}
    for construct in synth.app.node.find_all():
        for entry in construct.node.metadata:
            if entry.type == cdk.Validations.ACKNOWLEDGED_RULES_METADATA_KEY:
                for rule, reason in entry.data.items():
                    if "AwsSolutions-" in rule:
                        acknowledged[(construct.node.path, rule)] = reason
    assert acknowledged
    for (path, rule), reason in acknowledged.items():
        assert len(reason) >= 40, f"{path}: {rule} needs a reason, not {reason!r}"


def test_cdk_nag_is_really_checking():
    """The same checks on a plainly non-compliant stack do report it (the plugin is not a no-op here)."""
    from aws_cdk import aws_s3 as s3
    from cdk_nag import AwsSolutionsChecks

    app = cdk.App()
    stack = cdk.Stack(app, "Bad")
    s3.Bucket(stack, "Bucket", enforce_ssl=False)
    report = AwsSolutionsChecks().validate_scope(app)
    assert not report.success
    assert {"AwsSolutions-S1", "AwsSolutions-S10"} <= {v.rule_name for v in report.violations}


def test_cfn_lint_passes_on_every_synthesized_template(synth):
    templates = sorted(str(p) for p in synth.cli_out.glob("*.template.json"))
    assert len(templates) == len(STACKS)
    result = subprocess.run(
        [str(Path(sys.executable).parent / "cfn-lint"), "--ignore-checks", "W3005", "--", *templates],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_backend_in_another_region_keeps_the_page_in_us_east_1(tmp_path):
    page = tmp_path / "page"
    page.mkdir()
    (page / "index.html").write_text("<!doctype html>")
    app = cdk.App(
        context=cdk_json_context() | {"frontend_dist": str(page), "region": "eu-west-1"},
        outdir=str(tmp_path / "out"),
    )
    stacks = load_app_module().compose(app)
    app.synth()
    assert stacks["CsmCluster"].region == "eu-west-1" and stacks["CsmFrontend"].region == "us-east-1"
    Template.from_stack(stacks["CsmFrontend"]).resource_count_is("Custom::CrossRegionExportReader", 1)
    shutil.rmtree(tmp_path / "out", ignore_errors=True)


def test_weights_download_makes_the_checkpoint_appear_at_once(tmp_path):
    """The download task's script, run here with a stand-in for `csm-demo download`."""
    from csm_infra.weights_task import CSM_DEMO, download_script

    fake = tmp_path / "csm-demo"
    fake.write_text(
        '#!/bin/sh\nmkdir -p "$5"\necho "{}" > "$5/config.json"\necho weights > "$5/model.safetensors"\n'
    )
    fake.chmod(0o755)
    model = tmp_path / "weights" / "csm-1b"
    model.parent.mkdir()
    script = download_script("sesame/csm-1b", str(model)).replace(CSM_DEMO, str(fake))
    first = subprocess.run(["sh", "-c", script], capture_output=True, text=True, timeout=30)
    assert first.returncode == 0, first.stderr
    assert sorted(p.name for p in model.iterdir()) == ["config.json", "model.safetensors"]
    assert [p.name for p in model.parent.iterdir()] == ["csm-1b"]  # no staging folder left behind
    fake.write_text("#!/bin/sh\nexit 1\n")  # a second run must not download again
    second = subprocess.run(["sh", "-c", script], capture_output=True, text=True, timeout=30)
    assert second.returncode == 0 and "already holds weights" in second.stdout
