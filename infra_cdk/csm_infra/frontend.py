"""The page's distribution: a private S3 bucket, served by CloudFront behind AWS WAF (the CsmFrontend stack).

The bucket blocks all public access and refuses plain HTTP; only this distribution reads it (origin
access control, SigV4). What is in it (the built page and `config.json`) is written by the CsmPage
stack, deployed last (csm_infra/page.py): the page's address must exist before the Cognito client that
returns to it, and `config.json` names that client and the API.

This stack is always in us-east-1, where CloudFront's certificates and web ACLs must be; it takes
nothing from the backend's stacks, so it is the first to deploy.
"""

from __future__ import annotations

from aws_cdk import CfnOutput, Duration, RemovalPolicy, Stack
from aws_cdk import aws_certificatemanager as acm
from aws_cdk import aws_cloudfront as cloudfront
from aws_cdk import aws_cloudfront_origins as origins
from aws_cdk import aws_route53 as route53
from aws_cdk import aws_route53_targets as targets
from aws_cdk import aws_s3 as s3
from constructs import Construct

from csm_infra.config import Settings
from csm_infra.nag import acknowledge
from csm_infra.waf import PageFirewall


class FrontendStack(Stack):
    def __init__(self, scope: Construct, construct_id: str, *, settings: Settings, **kwargs) -> None:
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
        self.bucket = bucket = s3.Bucket(
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
        if settings.hosted_zone_id:
            self._dns(settings)
        # The page's address: where people go, and where Cognito returns them after signing in.
        self.page_url = f"https://{settings.domain_name or self.distribution.distribution_domain_name}/"
        CfnOutput(self, "PageUrl", value=self.page_url, description="open this; the page asks for the token")

    def _dns(self, settings: Settings) -> None:
        zone = route53.HostedZone.from_hosted_zone_attributes(
            self, "Zone", hosted_zone_id=settings.hosted_zone_id, zone_name=settings.hosted_zone_name
        )
        target = route53.RecordTarget.from_alias(targets.CloudFrontTarget(self.distribution))
        route53.ARecord(self, "Alias", zone=zone, record_name=settings.domain_name, target=target)
        route53.AaaaRecord(self, "AliasV6", zone=zone, record_name=settings.domain_name, target=target)
