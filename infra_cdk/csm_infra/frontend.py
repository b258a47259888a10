"""The page: the built `frontend/dist` in a private S3 bucket, served by CloudFront behind AWS WAF.

The bucket blocks all public access and refuses plain HTTP; only this distribution reads it (origin
access control, SigV4). Next to `index.html` the deployment writes `config.json` with the WebSocket
endpoint, so the page connects to this deployment's API. Only the endpoint: the token is a secret and a
person types it in (or a Cognito login supplies one); a public page must not carry it.

This stack is always in us-east-1, where CloudFront's certificates and web ACLs must be; when the
backend is in another region, the endpoint crosses over through CDK's cross-region references.
"""

from __future__ import annotations

from pathlib import Path

from aws_cdk import CfnOutput, DefaultStackSynthesizer, Duration, RemovalPolicy, Stack
from aws_cdk import aws_certificatemanager as acm
from aws_cdk import aws_cloudfront as cloudfront
from aws_cdk import aws_cloudfront_origins as origins
from aws_cdk import aws_route53 as route53
from aws_cdk import aws_route53_targets as targets
from aws_cdk import aws_s3 as s3
from aws_cdk import aws_s3_deployment as s3deploy
from constructs import Construct

from csm_infra.config import Settings
from csm_infra.nag import acknowledge
from csm_infra.waf import PageFirewall

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


class FrontendStack(Stack):
    def __init__(
        self, scope: Construct, construct_id: str, *, settings: Settings, api_endpoint: str, **kwargs
    ) -> None:
        super().__init__(scope, construct_id, **kwargs)
        logs_bucket = s3.Bucket(
            self,
            "AccessLogs",
            block_public_access=s3.BlockPublicAccess.BLOCK_ALL,
            encryption=s3.BucketEncryption.S3_MANAGED,
            enforce_ssl=True,
            # CloudFront's standard logs are delivered with an ACL, so this bucket keeps ACLs enabled.
            object_ownership=s3.ObjectOwnership.BUCKET_OWNER_PREFERRED,
            lifecycle_rules=[s3.LifecycleRule(expiration=Duration.days(90))],
            removal_policy=RemovalPolicy.RETAIN,
        )
        acknowledge(
            logs_bucket,
            "AwsSolutions-S1",
            "This is the access log bucket; logging its own access would log forever.",
        )
        bucket = s3.Bucket(
            self,
            "Page",
            block_public_access=s3.BlockPublicAccess.BLOCK_ALL,
            encryption=s3.BucketEncryption.S3_MANAGED,
            enforce_ssl=True,
            versioned=True,
            server_access_logs_bucket=logs_bucket,
            server_access_logs_prefix="s3/",
            removal_policy=RemovalPolicy.DESTROY,
            auto_delete_objects=True,  # the page is rebuilt from the repository; nothing to keep
        )
        firewall = PageFirewall(self, "Firewall")
        custom_domain = bool(settings.domain_name)
        self.distribution = cloudfront.Distribution(
            self,
            "Distribution",
            comment="CSM voice conversations: the page",
            default_behavior=cloudfront.BehaviorOptions(
                origin=origins.S3BucketOrigin.with_origin_access_control(bucket),
                viewer_protocol_policy=cloudfront.ViewerProtocolPolicy.REDIRECT_TO_HTTPS,
                cache_policy=cloudfront.CachePolicy.CACHING_OPTIMIZED,
                response_headers_policy=cloudfront.ResponseHeadersPolicy.SECURITY_HEADERS,
            ),
            default_root_object="index.html",
            http_version=cloudfront.HttpVersion.HTTP2_AND_3,
            price_class=cloudfront.PriceClass.PRICE_CLASS_100,
            web_acl_id=firewall.web_acl.attr_arn,
            enable_logging=True,
            log_bucket=logs_bucket,
            log_file_prefix="cloudfront/",
            domain_names=[settings.domain_name] if custom_domain else None,
            certificate=(
                acm.Certificate.from_certificate_arn(self, "Certificate", settings.certificate_arn)
                if custom_domain
                else None
            ),
            minimum_protocol_version=cloudfront.SecurityPolicyProtocol.TLS_V1_2_2021
            if custom_domain
            else None,
        )
        acknowledge(
            self.distribution,
            "AwsSolutions-CFR1",
            "A public page for people anywhere; the API behind it takes a token.",
        )
        if not custom_domain:
            acknowledge(
                self.distribution,
                "AwsSolutions-CFR4",
                "The default *.cloudfront.net certificate cannot set a minimum TLS version; with the "
                "domain_name and certificate_arn context values it is TLS 1.2 (2021).",
            )
        deployment = s3deploy.BucketDeployment(
            self,
            "Deploy",
            destination_bucket=bucket,
            sources=[
                s3deploy.Source.asset(str(page_dir(settings))),
                s3deploy.Source.json_data("config.json", {"endpoint": api_endpoint}),
            ],
            distribution=self.distribution,
            distribution_paths=["/*"],
            memory_limit=512,
        )
        self._acknowledge_deployment_function(deployment, bucket)
        if settings.hosted_zone_id:
            self._dns(settings)
        url = f"https://{settings.domain_name or self.distribution.distribution_domain_name}/"
        CfnOutput(self, "PageUrl", value=url, description="open this; the page asks for the token")

    def _acknowledge_deployment_function(
        self, deployment: s3deploy.BucketDeployment, bucket: s3.Bucket
    ) -> None:
        """`BucketDeployment` runs a Lambda function that CDK defines (one per stack): its runtime, role
        and policies are CDK's, granted for exactly this copy (the CDK asset bucket to the page bucket,
        then a CloudFront invalidation)."""
        function = next(
            child for child in self.node.children if child.node.id.startswith("Custom::CDKBucketDeployment")
        )
        reason = (
            "CDK's BucketDeployment function: copies the page from CDK's asset bucket, invalidates the cache"
        )
        page = self.get_logical_id(bucket.node.default_child)
        assets = f"cdk-{DefaultStackSynthesizer.DEFAULT_QUALIFIER}-assets-<AWS::AccountId>-{self.region}"
        findings = [
            "AwsSolutions-L1",
            "AwsSolutions-IAM4[Policy::arn:<AWS::Partition>:iam::aws:policy/service-role/AWSLambdaBasicExecutionRole]",
            *(
                f"AwsSolutions-IAM5[Action::s3:{action}]"
                for action in ("GetBucket*", "GetObject*", "List*", "Abort*", "DeleteObject*")
            ),
            f"AwsSolutions-IAM5[Resource::arn:{self.partition}:s3:::{assets}/*]",
            f"AwsSolutions-IAM5[Resource::<{page}.Arn>/*]",
            "AwsSolutions-IAM5[Resource::*]",
        ]
        for finding in findings:
            acknowledge(function, finding, reason)
        del deployment  # only its function needs the acknowledgments

    def _dns(self, settings: Settings) -> None:
        zone = route53.HostedZone.from_hosted_zone_attributes(
            self, "Zone", hosted_zone_id=settings.hosted_zone_id, zone_name=settings.hosted_zone_name
        )
        target = route53.RecordTarget.from_alias(targets.CloudFrontTarget(self.distribution))
        route53.ARecord(self, "Alias", zone=zone, record_name=settings.domain_name, target=target)
        route53.AaaaRecord(self, "AliasV6", zone=zone, record_name=settings.domain_name, target=target)
