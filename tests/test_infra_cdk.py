"""The CDK app (infra_cdk/): synthesized once for the module, offline and without AWS credentials,
then one test per concern on the templates (`aws_cdk.assertions.Template`), cdk-nag's AwsSolutions
checks and cfn-lint over every template. A second synthesis, in-process only, has the `cognito` switch
on (the CsmAuth stack, the authorizer's Cognito settings, the page's sign-in config).

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
# In deploy order (app.py's docstring); CsmAuth only with `cognito` on.
STACKS = (
    "CsmRegistry",
    "CsmNetwork",
    "CsmStorage",
    "CsmFrontend",
    "CsmApi",
    "CsmCluster",
    "CsmPage",
    "CsmMonitoring",
)
COGNITO_STACKS = (*STACKS[:4], "CsmAuth", *STACKS[4:])
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


def write_page(page: Path) -> Path:
    (page / "assets").mkdir(parents=True)
    (page / "index.html").write_text('<!doctype html><script src="/assets/app.js"></script>')
    (page / "assets" / "app.js").write_text("console.log('page')")
    return page


def synthesize_in_process(context: dict, outdir: Path) -> tuple[cdk.App, dict[str, cdk.Stack]]:
    app = cdk.App(context=cdk_json_context() | context, outdir=str(outdir))
    stacks = load_app_module().compose(app)
    app.synth()  # cdk-nag runs here: an unacknowledged finding fails the synthesis
    return app, stacks


@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> Synthesized:
    work = tmp_path_factory.mktemp("cdk")
    page = write_page(work / "page")
    home = work / "home"
    home.mkdir()
    cli = start_cli_synth(work / "cli.out", page, home)
    try:
        app, stacks = synthesize_in_process({"frontend_dist": str(page)}, work / "app.out")
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


@pytest.fixture(scope="module")
def cognito_synth(tmp_path_factory) -> Synthesized:
    """The same app with `-c cognito=true` (in-process only: its templates are the assembly's)."""
    work = tmp_path_factory.mktemp("cdk-cognito")
    page = write_page(work / "page")
    app, stacks = synthesize_in_process({"frontend_dist": str(page), "cognito": "true"}, work / "app.out")
    templates = {name: Template.from_stack(stack) for name, stack in stacks.items()}
    return Synthesized(app, stacks, templates, work / "app.out", work / "app.out", 0, "")


def exported_value(synth: Synthesized, import_: dict) -> object:
    """What a same-region `Fn::ImportValue` resolves to: the exporting stack's output value."""
    name = import_["Fn::ImportValue"]
    producer = name.split(":", 1)[0]
    for output in synth.templates[producer].to_json().get("Outputs", {}).values():
        if output.get("Export", {}).get("Name") == name:
            return output["Value"]
    raise AssertionError(f"no export {name} in {producer}")


def container_environment(template: Template, family: str) -> dict[str, object]:
    (task,) = [
        t
        for t in template.find_resources("AWS::ECS::TaskDefinition").values()
        if t["Properties"].get("Family") == family
    ]
    (container,) = task["Properties"]["ContainerDefinitions"]
    return {e["Name"]: e["Value"] for e in container["Environment"]}


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
    spot = Settings.from_context(
        cdk.App(context={"instance_types": "g5.xlarge", "on_demand_nodes": "1"}).node
    )
    assert spot.instance_types == ["g5.xlarge"] and spot.on_demand_nodes == 1
    for bad, match in (
        ({"on_demand_nodes": 0}, "on_demand_nodes"),  # the head must have an on-demand node
        ({"instance_types": []}, "instance_types"),
        ({"instance_types": ["g4dn.xlarge", "g4dn.xlarge"]}, "twice"),
        ({"instance_types": ["g4dn xlarge"]}, "instance type"),
        ({"instance_type": "g4dn.xlarge"}, "instance_types"),  # the old name is not silently ignored
        ({"cognito_domain_prefix": "my-cognito-login"}, "cognito_domain_prefix"),
        ({"cognito_domain_prefix": "Voice"}, "cognito_domain_prefix"),
        ({"cognito_callback_urls": ["http://voice.example.com/"]}, "cognito_callback_urls"),
    ):
        with pytest.raises(ValueError, match=match):
            Settings.from_context(cdk.App(context=bad).node)
    cognito = Settings.from_context(
        cdk.App(
            context={
                "cognito": "true",
                "cognito_callback_urls": "http://localhost:5173/,https://dev.example.com/",
            }
        ).node
    )
    assert cognito.cognito and not cognito.cognito_self_sign_up
    assert cognito.cognito_callback_urls == ["http://localhost:5173/", "https://dev.example.com/"]


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
                    "InstanceType": Match.absent(),  # the group's overrides name the types
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
                    "ManagedDraining": "ENABLED",
                }
            )
        },
    )
    cluster.has_resource_properties(
        "AWS::ECS::Cluster", {"ClusterSettings": [{"Name": "containerInsights", "Value": "enabled"}]}
    )


def test_gpu_group_is_on_demand_for_the_first_nodes_and_spot_above(synth):
    cluster = synth.templates["CsmCluster"]
    (group,) = cluster.find_resources("AWS::AutoScaling::AutoScalingGroup").values()
    props = group["Properties"]
    assert "LaunchTemplate" not in props  # the mixed-instances policy holds it
    policy = props["MixedInstancesPolicy"]
    assert policy["InstancesDistribution"] == {
        "OnDemandBaseCapacity": 2,
        "OnDemandPercentageAboveBaseCapacity": 0,
        "OnDemandAllocationStrategy": "prioritized",
        "SpotAllocationStrategy": "price-capacity-optimized",
    }
    assert policy["LaunchTemplate"]["Overrides"] == [
        {"InstanceType": "g4dn.xlarge"},
        {"InstanceType": "g4dn.2xlarge"},
    ]
    (template_id,) = cluster.find_resources("AWS::EC2::LaunchTemplate")
    assert policy["LaunchTemplate"]["LaunchTemplateSpecification"]["LaunchTemplateId"] == {"Ref": template_id}
    assert props["CapacityRebalance"] is True
    # The user data: the ECS agent drains on a Spot notice, and the lifecycle attribute the head's placement
    # needs is written (the commands test_instance_user_data_records_its_lifecycle... runs).
    from csm_infra.capacity import lifecycle_commands

    data = cluster.find_resources("AWS::EC2::LaunchTemplate")[template_id]["Properties"]["LaunchTemplateData"]
    script = "".join(part for part in data["UserData"]["Fn::Base64"]["Fn::Join"][1] if isinstance(part, str))
    lines = script.splitlines()
    assert "echo ECS_ENABLE_SPOT_INSTANCE_DRAINING=true >> /etc/ecs/ecs.config" in lines
    commands = lifecycle_commands()
    assert lines[lines.index(commands[0]) :][: len(commands)] == commands


@pytest.mark.parametrize(
    ("imds_answer", "expected"),
    [("on-demand", "on-demand"), ("spot", "spot"), (None, "spot")],  # no answer: never the head's
)
def test_instance_user_data_records_its_lifecycle_as_an_ecs_attribute(tmp_path, imds_answer, expected):
    """The user data's lifecycle commands, run here with a stand-in for curl that plays IMDSv2."""
    from csm_infra.capacity import lifecycle_commands

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    answer = f'printf %s "{imds_answer}"' if imds_answer else "exit 22"
    (bin_dir / "curl").write_text(
        "#!/bin/sh\n"
        'case "$*" in\n'
        '  *"-X PUT"*api/token*) printf token ;;\n'
        f'  *"X-aws-ec2-metadata-token: token"*meta-data/instance-life-cycle*) {answer} ;;\n'
        "  *) exit 22 ;;\n"
        "esac\n"
    )
    (bin_dir / "curl").chmod(0o755)
    config = tmp_path / "ecs.config"
    config.write_text("ECS_ENABLE_GPU_SUPPORT=true\n")
    script = "\n".join(lifecycle_commands(str(config)))
    env = {"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    result = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=30, env=env)
    assert result.returncode == 0, result.stderr
    lines = config.read_text().splitlines()
    assert lines[0] == "ECS_ENABLE_GPU_SUPPORT=true"
    name, _, value = lines[1].partition("=")
    assert name == "ECS_INSTANCE_ATTRIBUTES" and json.loads(value) == {"csm.lifecycle": expected}


def test_the_ray_head_is_placed_on_on_demand_instances_only(synth):
    cluster = synth.templates["CsmCluster"]
    services = {
        s["Properties"]["ServiceName"]: s["Properties"]
        for s in cluster.find_resources("AWS::ECS::Service").values()
    }
    assert services["ray-head"]["PlacementConstraints"] == [
        {"Type": "memberOf", "Expression": "attribute:csm.lifecycle == on-demand"}
    ]
    assert "PlacementConstraints" not in services["ray-worker"]  # workers may run on Spot


def test_spot_notices_reach_a_queue_the_head_drains(synth):
    cluster = synth.templates["CsmCluster"]
    queues = cluster.find_resources("AWS::SQS::Queue")
    (queue_id,) = [k for k, q in queues.items() if "RedrivePolicy" in q["Properties"]]
    (dlq_id,) = [k for k in queues if k != queue_id]
    queue = queues[queue_id]["Properties"]
    assert queue["SqsManagedSseEnabled"] is True and queues[dlq_id]["Properties"]["SqsManagedSseEnabled"]
    assert queue["MessageRetentionPeriod"] <= 3600  # a notice is stale within minutes
    assert queue["RedrivePolicy"]["deadLetterTargetArn"] == {"Fn::GetAtt": [dlq_id, "Arn"]}
    for policy in cluster.find_resources("AWS::SQS::QueuePolicy").values():
        assert any(
            s["Effect"] == "Deny" and s.get("Condition") == {"Bool": {"aws:SecureTransport": "false"}}
            for s in policy["Properties"]["PolicyDocument"]["Statement"]
        )
    (rule,) = cluster.find_resources("AWS::Events::Rule").values()
    assert rule["Properties"]["EventPattern"] == {
        "source": ["aws.ec2"],
        "detail-type": ["EC2 Spot Instance Interruption Warning", "EC2 Instance Rebalance Recommendation"],
    }
    (target,) = rule["Properties"]["Targets"]
    assert target["Arn"] == {"Fn::GetAtt": [queue_id, "Arn"]}
    assert target["DeadLetterConfig"]["Arn"] == {"Fn::GetAtt": [dlq_id, "Arn"]}
    head = container_environment(cluster, "csm-ray-head")
    assert head["CSM_DRAIN_QUEUE_URL"] == {"Ref": queue_id}
    assert head["CSM_CLUSTER_NAME"] == "csm-voice" and head["AWS_REGION"] == "us-east-1"
    assert head["AWS_DEFAULT_REGION"] == "us-east-1"  # the one botocore reads
    assert "CSM_DRAIN_QUEUE_URL" not in container_environment(cluster, "csm-ray-worker")


def _task_role_statements(template: Template, family: str) -> list[dict]:
    (task,) = [
        t
        for t in template.find_resources("AWS::ECS::TaskDefinition").values()
        if t["Properties"].get("Family") == family
    ]
    role = task["Properties"]["TaskRoleArn"]["Fn::GetAtt"][0]
    return [
        statement
        for policy in template.find_resources("AWS::IAM::Policy").values()
        if {"Ref": role} in policy["Properties"]["Roles"]
        for statement in policy["Properties"]["PolicyDocument"]["Statement"]
    ]


def test_only_the_heads_role_may_read_notices_and_the_clusters_tasks(synth):
    cluster = synth.templates["CsmCluster"]
    (queue_id,) = [
        k for k, q in cluster.find_resources("AWS::SQS::Queue").items() if "RedrivePolicy" in q["Properties"]
    ]
    (cluster_id,) = cluster.find_resources("AWS::ECS::Cluster")
    cluster_arn = {"Fn::GetAtt": [cluster_id, "Arn"]}
    head = _task_role_statements(cluster, "csm-ray-head")
    by_action = {json.dumps(s["Action"]): s for s in head}
    sqs = by_action[json.dumps(["sqs:DeleteMessage", "sqs:ReceiveMessage"])]
    assert sqs["Resource"] == {"Fn::GetAtt": [queue_id, "Arn"]}
    assert by_action['"ecs:ListContainerInstances"']["Resource"] == cluster_arn
    assert by_action['"ecs:ListTasks"']["Condition"] == {"ArnEquals": {"ecs:cluster": cluster_arn}}
    parts = by_action['"ecs:DescribeTasks"']["Resource"]["Fn::Join"][1]
    assert parts[0] == "arn:aws:ecs:us-east-1:" and parts[-1] == ":task/csm-voice/*"
    head_actions = {a for s in head for a in ([s["Action"]] if isinstance(s["Action"], str) else s["Action"])}
    assert {a for a in head_actions if a.startswith(("sqs:", "ecs:"))} == {
        "sqs:ReceiveMessage",
        "sqs:DeleteMessage",
        "ecs:ListContainerInstances",
        "ecs:ListTasks",
        "ecs:DescribeTasks",
    }
    worker = json.dumps(_task_role_statements(cluster, "csm-ray-worker"))
    assert "execute-api:ManageConnections" in worker  # the same role otherwise
    assert "sqs:" not in worker and "ecs:" not in worker


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


def test_manage_connections_is_granted_to_the_ray_task_roles_for_the_stage_only(synth):
    grants = [
        (stack, policy["Properties"], statement)
        for stack, _, policy in synth.resources("AWS::IAM::Policy")
        for statement in policy["Properties"]["PolicyDocument"]["Statement"]
        if "execute-api:ManageConnections" in json.dumps(statement["Action"])
    ]
    assert len(grants) == 2  # the head's role and the workers' (an ingress replica may run on either)
    roles = set()
    for stack, policy, statement in grants:
        assert stack == "CsmCluster"
        assert statement["Action"] == "execute-api:ManageConnections"
        parts = statement["Resource"]["Fn::Join"][1]
        assert _api_id_import(synth) in parts
        assert parts[-1] == "/prod/*/@connections/*"
        roles |= {role["Ref"] for role in policy["Roles"]}
    assert {re.sub(r"TaskRole\w*$", "", role) for role in roles} == {"Head", "Worker"}


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


def _rendered_config(synth: Synthesized) -> dict:
    """config.json as the deployment writes it, each marker replaced by its value with references shown
    as `<export or logical id>`."""

    def render(value: object) -> str:
        if isinstance(value, str):
            return value
        (function, argument), *_ = value.items()
        if function == "Fn::Join":
            return argument[0].join(render(part) for part in argument[1])
        if function == "Fn::ImportValue":
            return f"<{argument}>"
        assert function == "Ref", value
        return f"<{argument}>"

    (deployment,) = synth.templates["CsmPage"].find_resources("Custom::CDKBucketDeployment").values()
    markers = {k: render(v) for m in deployment["Properties"]["SourceMarkers"] for k, v in m.items()}
    (config,) = [p for p in synth.outdir.rglob("config.json")]
    return json.loads(
        re.sub(r"<<marker:0x[0-9a-f]+:\d+>>", lambda m: markers[m.group(0)], config.read_text())
    )


def test_page_stack_fills_the_frontends_bucket_and_invalidates_its_distribution(synth):
    assert synth.stacks["CsmPage"].region == "us-east-1"
    frontend = synth.templates["CsmFrontend"]
    frontend.resource_count_is("Custom::CDKBucketDeployment", 0)  # its content is CsmPage's
    (deployment,) = synth.templates["CsmPage"].find_resources("Custom::CDKBucketDeployment").values()
    props = deployment["Properties"]
    (distribution_id,) = frontend.find_resources("AWS::CloudFront::Distribution")
    page_bucket = next(k for k in frontend.find_resources("AWS::S3::Bucket") if k.startswith("Page"))
    assert exported_value(synth, props["DestinationBucketName"]) == {"Ref": page_bucket}
    assert exported_value(synth, props["DistributionId"]) == {"Ref": distribution_id}
    assert props["DistributionPaths"] == ["/*"]


def test_page_config_carries_the_endpoint_and_no_token(synth):
    config = _rendered_config(synth)
    assert set(config) == {"endpoint"}  # no "auth" without the cognito switch, and never a token
    api_id = _api_id_import(synth)["Fn::ImportValue"]
    assert config["endpoint"] == f"wss://<{api_id}>.execute-api.us-east-1.<AWS::URLSuffix>/prod"
    for name in synth.templates:
        synth.templates[name].resource_count_is("AWS::Cognito::UserPool", 0)


# ---- the cognito switch ---------------------------------------------------------------------------------
def test_cognito_user_pool_invites_users_with_strong_passwords_and_threat_protection(cognito_synth):
    assert set(cognito_synth.stacks) == set(COGNITO_STACKS)
    assert cognito_synth.stacks["CsmAuth"].region == "us-east-1"  # the backend's region
    auth = cognito_synth.templates["CsmAuth"]
    auth.resource_count_is("AWS::Cognito::UserPool", 1)
    auth.has_resource_properties(
        "AWS::Cognito::UserPool",
        {
            "AdminCreateUserConfig": Match.object_like({"AllowAdminCreateUserOnly": True}),
            "UsernameAttributes": ["email"],
            "Policies": {
                "PasswordPolicy": Match.object_like(
                    {
                        "MinimumLength": 12,
                        "RequireLowercase": True,
                        "RequireUppercase": True,
                        "RequireNumbers": True,
                        "RequireSymbols": True,
                    }
                )
            },
            "MfaConfiguration": "OPTIONAL",
            "EnabledMfas": ["SOFTWARE_TOKEN_MFA"],
            "UserPoolTier": "PLUS",
            "UserPoolAddOns": {"AdvancedSecurityMode": "ENFORCED"},
        },
    )
    (pool_id,) = auth.find_resources("AWS::Cognito::UserPool")
    auth.has_resource_properties(
        "AWS::Cognito::UserPoolDomain",
        {
            "UserPoolId": {"Ref": pool_id},
            "ManagedLoginVersion": 2,
            "Domain": {"Fn::Join": ["", ["csm-voice-", {"Ref": "AWS::AccountId"}]]},
        },
    )
    (client_id,) = auth.find_resources("AWS::Cognito::UserPoolClient")
    auth.has_resource_properties(
        "AWS::Cognito::ManagedLoginBranding",
        {"UserPoolId": {"Ref": pool_id}, "ClientId": {"Ref": client_id}, "UseCognitoProvidedValues": True},
    )
    for name in ("CsmFrontend", "CsmApi", "CsmCluster", "CsmPage"):
        cognito_synth.templates[name].resource_count_is("AWS::Cognito::UserPool", 0)


def test_cognito_page_client_is_a_public_code_flow_client_returning_to_the_page(cognito_synth):
    auth = cognito_synth.templates["CsmAuth"]
    (client,) = auth.find_resources("AWS::Cognito::UserPoolClient").values()
    props = client["Properties"]
    assert props["AllowedOAuthFlows"] == ["code"] and props["AllowedOAuthFlowsUserPoolClient"] is True
    assert props["GenerateSecret"] is False  # a public client: PKCE
    assert props["AllowedOAuthScopes"] == ["openid", "email", "profile"]
    assert props["PreventUserExistenceErrors"] == "ENABLED" and props["EnableTokenRevocation"] is True
    assert props["SupportedIdentityProviders"] == ["COGNITO"]
    minutes = {"AccessToken": 15, "IdToken": 15, "RefreshToken": 12 * 60}
    assert props["TokenValidityUnits"] == dict.fromkeys(minutes, "minutes")
    assert {k: props[f"{k}Validity"] for k in minutes} == minutes
    (distribution_id,) = cognito_synth.templates["CsmFrontend"].find_resources(
        "AWS::CloudFront::Distribution"
    )
    for urls in (props["CallbackURLs"], props["LogoutURLs"]):
        (url,) = urls
        prefix, domain, suffix = url["Fn::Join"][1]
        assert (prefix, suffix) == ("https://", "/")
        assert exported_value(cognito_synth, domain) == {"Fn::GetAtt": [distribution_id, "DomainName"]}


def test_cognito_callback_is_the_custom_domain_and_extra_urls_when_set(tmp_path):
    """With a custom domain the page's address is that domain (no synthesis of the whole app needed)."""
    from csm_infra.auth import AuthStack
    from csm_infra.frontend import FrontendStack

    settings = Settings(
        domain_name="voice.example.com",
        certificate_arn="arn:aws:acm:us-east-1:111122223333:certificate/abc",
        cognito=True,
        cognito_domain_prefix="voice-login",
        cognito_callback_urls=["http://localhost:5173/"],
    )
    app = cdk.App(outdir=str(tmp_path / "out"))
    env = cdk.Environment(region="us-east-1")
    frontend = FrontendStack(app, "CsmFrontend", settings=settings, env=env)
    assert frontend.page_url == "https://voice.example.com/"
    auth = Template.from_stack(
        AuthStack(app, "CsmAuth", settings=settings, page_url=frontend.page_url, env=env)
    )
    urls = ["https://voice.example.com/", "http://localhost:5173/"]
    auth.has_resource_properties("AWS::Cognito::UserPoolClient", {"CallbackURLs": urls, "LogoutURLs": urls})
    auth.has_resource_properties("AWS::Cognito::UserPoolDomain", {"Domain": "voice-login"})


def test_cognito_authorizer_accepts_the_pools_tokens_for_the_page_client(cognito_synth):
    api = cognito_synth.templates["CsmApi"]
    (pool_id,) = cognito_synth.templates["CsmAuth"].find_resources("AWS::Cognito::UserPool")
    (client_id,) = cognito_synth.templates["CsmAuth"].find_resources("AWS::Cognito::UserPoolClient")
    for function in api.find_resources("AWS::Lambda::Function").values():
        variables = function["Properties"]["Environment"]["Variables"]
        cognito = {k: v for k, v in variables.items() if k.startswith("COGNITO_")}
        if function["Properties"]["Handler"] != "lambda_bridge.authorizer.handler":
            assert not cognito  # only the authorizer checks Cognito's tokens
            continue
        assert set(cognito) == {"COGNITO_USER_POOL_ID", "COGNITO_CLIENT_ID", "COGNITO_REGION"}
        assert exported_value(cognito_synth, cognito["COGNITO_USER_POOL_ID"]) == {"Ref": pool_id}
        assert exported_value(cognito_synth, cognito["COGNITO_CLIENT_ID"]) == {"Ref": client_id}
        assert cognito["COGNITO_REGION"] == "us-east-1"
        assert "TOKEN_SECRET_ARN" in variables  # the shared token still works


def test_cognito_page_config_says_where_to_sign_in(cognito_synth):
    config = _rendered_config(cognito_synth)
    (domain_id,) = cognito_synth.templates["CsmAuth"].find_resources("AWS::Cognito::UserPoolDomain")
    (client_id,) = cognito_synth.templates["CsmAuth"].find_resources("AWS::Cognito::UserPoolClient")
    assert set(config) == {"endpoint", "auth"} and config["endpoint"].startswith("wss://")
    auth = config["auth"]
    assert set(auth) == {"domain", "clientId", "scopes"}
    domain_export = re.fullmatch(r"https://<(.+)>\.auth\.us-east-1\.amazoncognito\.com", auth["domain"])
    assert domain_export
    assert exported_value(cognito_synth, {"Fn::ImportValue": domain_export.group(1)}) == {"Ref": domain_id}
    client_export = re.fullmatch(r"<(.+)>", auth["clientId"])
    assert client_export
    assert exported_value(cognito_synth, {"Fn::ImportValue": client_export.group(1)}) == {"Ref": client_id}
    assert auth["scopes"] == ["openid", "email", "profile"]


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
        ("AWS/SQS", "ApproximateNumberOfMessagesVisible"),
    ):
        assert signal in watched, signal
    # The SQS alarm watches the drain notices' dead-letter queue, not their live queue (which fills and
    # empties as Spot notices come and go).
    cluster = synth.templates["CsmCluster"]
    dead_letters = next(
        name
        for name, queue in cluster.find_resources("AWS::SQS::Queue").items()
        if "RedrivePolicy" not in queue["Properties"]
    )
    (sqs_alarm,) = [a for a in alarms if a["Properties"].get("Namespace") == "AWS/SQS"]
    (dimension,) = sqs_alarm["Properties"]["Dimensions"]
    assert dimension["Name"] == "QueueName"
    assert exported_value(synth, dimension["Value"]) == {"Fn::GetAtt": [dead_letters, "QueueName"]}
    assert watched.count(("AWS/Lambda", "Errors")) == 4
    assert watched.count(("AWS/Lambda", "Throttles")) == 4
    topic = next(iter(monitoring.find_resources("AWS::SNS::Topic")))
    for alarm in alarms:
        assert alarm["Properties"]["AlarmActions"] == [{"Ref": topic}]
    monitoring.has_resource_properties("AWS::SNS::Topic", {"KmsMasterKeyId": Match.any_value()})
    monitoring.resource_count_is("AWS::CloudWatch::Dashboard", 1)


# ---- done-when 3: cdk-nag and cfn-lint ---------------------------------------------------------------------
@pytest.mark.parametrize("fixture", ["synth", "cognito_synth"])
def test_cdk_nag_aws_solutions_has_no_unacknowledged_finding(fixture, request):
    from cdk_nag import AwsSolutionsChecks

    synth = request.getfixturevalue(fixture)
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


def test_cfn_lint_passes_on_every_synthesized_template(synth, cognito_synth):
    templates = sorted(str(p) for p in synth.cli_out.glob("*.template.json"))
    assert len(templates) == len(STACKS)
    # With the cognito switch, the stacks it changes.
    templates += [
        str(cognito_synth.outdir / f"{name}.template.json") for name in ("CsmAuth", "CsmApi", "CsmPage")
    ]
    result = subprocess.run(
        [str(Path(sys.executable).parent / "cfn-lint"), "--ignore-checks", "W3005", "--", *templates],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_backend_in_another_region_keeps_the_page_in_us_east_1(tmp_path):
    """The page's stacks stay in us-east-1; what crosses regions goes through CDK's cross-region
    references: the page's address to CsmAuth, the endpoint and the client to CsmPage."""
    page = tmp_path / "page"
    page.mkdir()
    (page / "index.html").write_text("<!doctype html>")
    app = cdk.App(
        context=cdk_json_context() | {"frontend_dist": str(page), "region": "eu-west-1", "cognito": True},
        outdir=str(tmp_path / "out"),
    )
    stacks = load_app_module().compose(app)
    app.synth()
    assert {name for name, stack in stacks.items() if stack.region == "us-east-1"} == {
        "CsmFrontend",
        "CsmPage",
    }
    assert stacks["CsmCluster"].region == "eu-west-1" and stacks["CsmAuth"].region == "eu-west-1"
    for name in ("CsmAuth", "CsmPage"):
        Template.from_stack(stacks[name]).resource_count_is("Custom::CrossRegionExportReader", 1)
    for name in ("CsmFrontend", "CsmApi"):
        Template.from_stack(stacks[name]).resource_count_is("Custom::CrossRegionExportReader", 0)
    Template.from_stack(stacks["CsmApi"]).has_resource_properties(
        "AWS::Lambda::Function",
        {"Environment": {"Variables": Match.object_like({"COGNITO_REGION": "eu-west-1"})}},
    )
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
