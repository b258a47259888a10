"""The page's content: the built `frontend/dist` and `config.json`, copied into CsmFrontend's bucket, then
the distribution's cache invalidated (the CsmPage stack, in us-east-1 like CsmFrontend).

`config.json` tells the page where this deployment is:

    {"endpoint": "wss://<api>.execute-api.<region>.amazonaws.com/prod",
     "auth": {"domain": "https://<prefix>.auth.<region>.amazoncognito.com",
              "clientId": "<app client id>", "scopes": ["openid", "email", "profile"]}}

`auth` only with the `cognito` context value on. Never the token: it is a secret and a person types it
in (or signs in); a public page must not carry it.

This is the last stack: it needs the API's endpoint and the user pool's client, which themselves need the
distribution's address (the client's callback URL), so the distribution and its bucket (CsmFrontend) come
first and their content last. When the backend is in another region, the endpoint and the client cross
over through CDK's cross-region references.
"""

from __future__ import annotations

from pathlib import Path

from aws_cdk import DefaultStackSynthesizer, Stack
from aws_cdk import aws_cloudfront as cloudfront
from aws_cdk import aws_s3 as s3
from aws_cdk import aws_s3_deployment as s3deploy
from constructs import Construct

from csm_infra.auth import SignIn
from csm_infra.config import Settings
from csm_infra.nag import acknowledge

INFRA_ROOT = Path(__file__).resolve().parents[1]


def page_dir(settings: Settings) -> Path:
    """The built page; `cdk synth` stops here with a clear message when it has not been built."""
    path = (INFRA_ROOT / settings.frontend_dist).resolve()
    if not (path / "index.html").is_file():
        raise FileNotFoundError(
            f"{path}/index.html is missing: build the page first (`make frontend-build`), "
            "or point the context value frontend_dist at a build"
        )
    return path


def page_config(endpoint: str, sign_in: SignIn | None) -> dict[str, object]:
    """config.json: the WebSocket endpoint, and where to sign in when there is a user pool."""
    config: dict[str, object] = {"endpoint": endpoint}
    if sign_in is not None:
        config["auth"] = sign_in.page_config()
    return config


class PageStack(Stack):
    def __init__(
        self,
        scope: Construct,
        construct_id: str,
        *,
        settings: Settings,
        bucket: s3.IBucket,
        distribution: cloudfront.IDistribution,
        endpoint: str,
        sign_in: SignIn | None,
        **kwargs,
    ) -> None:
        super().__init__(scope, construct_id, **kwargs)
        self.deployment = s3deploy.BucketDeployment(
            self,
            "Deploy",
            destination_bucket=bucket,
            sources=[
                s3deploy.Source.asset(str(page_dir(settings))),
                s3deploy.Source.json_data("config.json", page_config(endpoint, sign_in)),
            ],
            distribution=distribution,
            distribution_paths=["/*"],
            memory_limit=512,
        )
        self._acknowledge_deployment_function(bucket)

    def _acknowledge_deployment_function(self, bucket: s3.IBucket) -> None:
        """`BucketDeployment` runs a Lambda function that CDK defines (one per stack): its runtime, role
        and policies are CDK's, granted for exactly this copy (the CDK asset bucket to the page bucket,
        then a CloudFront invalidation)."""
        function = next(
            child for child in self.node.children if child.node.id.startswith("Custom::CDKBucketDeployment")
        )
        reason = (
            "CDK's BucketDeployment function: copies the page from CDK's asset bucket, invalidates the cache"
        )
        # The page bucket is CsmFrontend's: cdk-nag names it by the name of its ARN's export.
        page = self.resolve(Stack.of(bucket).export_value(bucket.bucket_arn))["Fn::ImportValue"]
        assets = f"cdk-{DefaultStackSynthesizer.DEFAULT_QUALIFIER}-assets-<AWS::AccountId>-{self.region}"
        findings = [
            "AwsSolutions-L1",
            "AwsSolutions-IAM4[Policy::arn:<AWS::Partition>:iam::aws:policy/service-role/AWSLambdaBasicExecutionRole]",
            *(
                f"AwsSolutions-IAM5[Action::s3:{action}]"
                for action in ("GetBucket*", "GetObject*", "List*", "Abort*", "DeleteObject*")
            ),
            f"AwsSolutions-IAM5[Resource::arn:{self.partition}:s3:::{assets}/*]",
            f"AwsSolutions-IAM5[Resource::{page}/*]",
            "AwsSolutions-IAM5[Resource::*]",
        ]
        for finding in findings:
            acknowledge(function, finding, reason)
