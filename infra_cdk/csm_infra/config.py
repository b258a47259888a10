"""The deployment's settings: CDK context values (`cdk.json`, or `-c name=value`), each with a default.

Every value has a default that deploys a working footprint, so `cdk deploy --all` needs no edits; the
defaults are repeated in `cdk.json` so that an engineer sees them where they change them (a test keeps
the two the same). Values are checked here, once, so a typo fails `cdk synth` with a clear message
rather than a CloudFormation rollback twenty minutes later.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field, fields
from typing import Any

from constructs import Node


@dataclass(frozen=True)
class Settings:
    # Where the backend runs (the VPC, the cluster, the API). The page's stack is always in us-east-1:
    # CloudFront's certificates and WAF web ACLs live there.
    region: str = "us-east-1"
    # Optional fixed AZs, e.g. ["us-east-1a", "us-east-1b"]: pick ones that offer the instance type
    # (`aws ec2 describe-instance-type-offerings --location-type availability-zone`). Default: the
    # region's first two, resolved at deploy time (no lookup, so `cdk synth` runs offline).
    availability_zones: list[str] = field(default_factory=list)
    nat_gateways: int = 1  # 2 for a NAT per AZ (about $33/month more)
    # The GPU instance types, in order of preference for on-demand capacity (Spot takes whichever pool is
    # cheapest and least likely to be interrupted). Each must have one NVIDIA GPU (one Ray node per
    # instance), at least 4 vCPUs and 16 GiB: the Ray task reserves 3.5 vCPU and 12 GiB (ray_task.py).
    instance_types: list[str] = field(default_factory=lambda: ["g4dn.xlarge", "g4dn.2xlarge"])
    min_nodes: int = 1  # GPU instances always running (the Ray head is one of them)
    max_nodes: int = 3  # the most GPU instances; workers = nodes - 1
    # The first on_demand_nodes instances are on-demand (the head's node, and the first worker's), every
    # one above them Spot. The head runs on on-demand only, so at least 1; max_nodes or more: no Spot.
    on_demand_nodes: int = 2
    root_volume_gib: int = 100  # the CUDA image is about 10 GB; Ray spills objects here
    image_repository: str = "csm-voice"  # ECR repository (created by the CsmRegistry stack)
    image_tag: str = "0.1.0"  # the image to run; tags are immutable, so push a new tag per release
    model_path: str = "/weights/csm-1b"  # MODEL_PATH inside the container (EFS weights access point)
    hf_repo: str = "sesame/csm-1b"  # what the weights download task fetches
    domain_name: str = ""  # optional custom domain for the page, e.g. "voice.example.com"
    certificate_arn: str = ""  # ACM certificate in us-east-1 for domain_name (required with it)
    hosted_zone_id: str = ""  # optional Route 53 zone: alias records for domain_name are created
    hosted_zone_name: str = ""
    alarm_email: str = ""  # optional: subscribe this address to the alarm topic
    api_rate_limit: int = 2000  # WebSocket messages per second for the stage (25/s per conversation)
    api_burst_limit: int = 4000
    frontend_dist: str = "../frontend/dist"  # the built page (`make frontend-build`), relative to cdk.json
    # Optional sign-in with a Cognito user pool (the CsmAuth stack); the shared token keeps working.
    cognito: bool = False
    cognito_self_sign_up: bool = False  # off: an administrator creates the users (README)
    # The managed login's address, https://<prefix>.auth.<region>.amazoncognito.com; it must be unique
    # in the region. Default: "csm-voice-<account id>".
    cognito_domain_prefix: str = ""
    # Callback and sign-out URLs besides the page's own, e.g. ["http://localhost:5173/"] for development.
    cognito_callback_urls: list[str] = field(default_factory=list)

    @classmethod
    def from_context(cls, node: Node) -> Settings:
        if node.try_get_context("instance_type") is not None:
            raise ValueError('context instance_type is now instance_types, a list: ["g4dn.xlarge", ...]')
        values: dict[str, Any] = {}
        for name, default in defaults().items():
            raw = node.try_get_context(name)
            if raw is not None:
                values[name] = _coerce(name, raw, default)
        settings = cls(**values)
        settings.validate()
        return settings

    def validate(self) -> None:
        if not re.fullmatch(r"[a-z]{2}(-gov)?-[a-z]+-\d", self.region):
            raise ValueError(f"context region: {self.region!r} is not an AWS region name")
        if not 1 <= self.min_nodes <= self.max_nodes:
            raise ValueError(
                f"context: need 1 <= min_nodes ({self.min_nodes}) <= max_nodes ({self.max_nodes})"
            )
        if not 1 <= self.nat_gateways <= 3:
            raise ValueError(
                "context nat_gateways: 1 to 3 (the VPC's private subnets need one to reach AWS APIs)"
            )
        if self.domain_name and not self.certificate_arn.startswith("arn:"):
            raise ValueError("context domain_name needs certificate_arn (an ACM certificate in us-east-1)")
        if bool(self.hosted_zone_id) != bool(self.hosted_zone_name):
            raise ValueError("context hosted_zone_id and hosted_zone_name go together")
        if self.availability_zones and len(self.availability_zones) < 2:
            raise ValueError("context availability_zones: name at least two")
        if not self.model_path.startswith("/weights/"):
            raise ValueError("context model_path must be under /weights/ (the EFS weights access point)")
        self._validate_capacity()
        self._validate_cognito()

    def _validate_capacity(self) -> None:
        if not self.instance_types:
            raise ValueError("context instance_types: name at least one GPU instance type")
        for name in self.instance_types:
            if not _INSTANCE_TYPE.fullmatch(name):
                raise ValueError(f"context instance_types: {name!r} is not an EC2 instance type name")
        if len(set(self.instance_types)) != len(self.instance_types):
            raise ValueError(f"context instance_types: {self.instance_types} names a type twice")
        if self.on_demand_nodes < 1:
            raise ValueError(
                f"context on_demand_nodes: {self.on_demand_nodes}; at least 1, the Ray head's on-demand node"
            )

    def _validate_cognito(self) -> None:
        prefix = self.cognito_domain_prefix
        if prefix and (not _DOMAIN_PREFIX.fullmatch(prefix) or re.search("aws|amazon|cognito", prefix)):
            raise ValueError(
                f"context cognito_domain_prefix: {prefix!r}; lower-case letters, digits and inner hyphens, "
                "at most 63, without 'aws', 'amazon' or 'cognito'"
            )
        for url in self.cognito_callback_urls:
            if not _CALLBACK_URL.fullmatch(url):
                raise ValueError(
                    f"context cognito_callback_urls: {url!r}; Cognito takes https:// URLs, or http:// "
                    "for localhost only"
                )


_INSTANCE_TYPE = re.compile(r"[a-z][a-z0-9-]*\.[a-z0-9]+")
_DOMAIN_PREFIX = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")
_CALLBACK_URL = re.compile(r"(https://[^\s/#]+|http://localhost(:\d+)?)(/[^\s#]*)?")


def _coerce(name: str, raw: Any, default: Any) -> Any:
    """Context from `-c name=value` arrives as a string; from cdk.json, as JSON. Accept both."""
    if isinstance(default, bool):
        return raw if isinstance(raw, bool) else str(raw).lower() in ("1", "true", "yes")
    if isinstance(default, int):
        try:
            return int(raw)
        except (TypeError, ValueError):
            raise ValueError(f"context {name}: {raw!r} is not a whole number") from None
    if isinstance(default, list):
        if isinstance(raw, str):
            raw = json.loads(raw) if raw.startswith("[") else [s.strip() for s in raw.split(",") if s.strip()]
        return list(raw)
    return str(raw)


def defaults() -> dict[str, Any]:
    """The defaults as cdk.json lists them."""
    d = Settings()
    return {f.name: getattr(d, f.name) for f in fields(Settings)}
