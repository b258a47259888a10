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
    instance_type: str = "g4dn.xlarge"  # one NVIDIA GPU per instance: one Ray node per instance
    min_nodes: int = 1  # GPU instances always running (the Ray head is one of them)
    max_nodes: int = 3  # the most GPU instances; workers = nodes - 1
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

    @classmethod
    def from_context(cls, node: Node) -> Settings:
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
