"""The API: API Gateway's WebSocket API in front of the bridge Lambdas (`lambda_bridge/`).

The browser's socket ends here. Route selection is `$request.body.type`, and every event of the
realtime protocol goes to `$default` (the bridge forwards it untouched); `$connect` is guarded by the
Lambda authorizer (the shared token, `?token=` or `Authorization: Bearer`), the only route API Gateway
lets an authorizer guard. The Lambdas run in the VPC's private subnets: they reach the Serve ingress at
`SERVE_URL` (the Ray head's Cloud Map name), and, through the NAT gateway, Secrets Manager.

Two tokens are generated into Secrets Manager here (csm_infra/tokens.py): the users' token, which only
the authorizer reads (it is never written into the page; the README says how a person gets it), and
the bridge token, which only the three handlers read and present to the ingress. The stage logs every
connection and message to CloudWatch Logs and is throttled. WebSocket APIs cannot have a WAF web ACL;
throttling and the authorizer are their protection.

With the `cognito` context value on, the authorizer also accepts the user pool's JWTs for the page's app
client (`COGNITO_USER_POOL_ID`, `COGNITO_CLIENT_ID`, `COGNITO_REGION`, from the CsmAuth stack, deployed
before this one); the principal is then `cognito:<sub>`. The shared token keeps working.

This stack comes before the cluster, which takes `bridge_link()`: both tokens, the stage (its
`@connections` URL is the one place the ingress posts replies, configured in the task's environment;
the cluster grants its task role `ManageConnections` on this stage alone) and the bridge's security
group (the cluster admits it, alone, on Serve's port 8000).
"""

from __future__ import annotations

import jsii
from aws_cdk import CfnOutput, Duration, RemovalPolicy, Stack
from aws_cdk import aws_apigateway as apigw
from aws_cdk import aws_apigatewayv2 as apigwv2
from aws_cdk import aws_apigatewayv2_authorizers as authorizers
from aws_cdk import aws_apigatewayv2_integrations as integrations
from aws_cdk import aws_ec2 as ec2
from aws_cdk import aws_iam as iam
from aws_cdk import aws_lambda as lambda_
from aws_cdk import aws_logs as logs
from constructs import Construct

from csm_infra.auth import SignIn
from csm_infra.bridge_asset import bridge_code
from csm_infra.cluster import SERVE_PORT, BridgeLink
from csm_infra.config import Settings
from csm_infra.nag import acknowledge
from csm_infra.tokens import ApiTokens

STAGE = "prod"
RUNTIME = lambda_.Runtime.PYTHON_3_12
# API Gateway ends an integration after 29 s; the bridge gives up forwarding after FORWARD_DEADLINE_S
# (20 s) and still needs time to tell the person, so the Lambdas may run 25 s.
HANDLER_TIMEOUT = Duration.seconds(25)


@jsii.implements(apigwv2.IAccessLogSettings)
class _AccessLogs:
    """One JSON line per connection, message and disconnection, in a log group of the stack."""

    def __init__(self, log_group: logs.ILogGroup) -> None:
        self._destination = apigwv2.LogGroupLogDestination(log_group)

    @property
    def destination(self) -> apigwv2.IAccessLogDestination:
        return self._destination

    @property
    def format(self) -> apigw.AccessLogFormat:
        return apigw.AccessLogFormat.custom(
            '{"requestId":"$context.requestId","ip":"$context.identity.sourceIp",'
            '"requestTime":"$context.requestTime","eventType":"$context.eventType",'
            '"routeKey":"$context.routeKey","connectionId":"$context.connectionId",'
            '"status":"$context.status","integrationError":"$context.integrationErrorMessage",'
            '"authorizerError":"$context.authorizer.error"}'
        )


class ApiStack(Stack):
    def __init__(
        self,
        scope: Construct,
        construct_id: str,
        *,
        settings: Settings,
        vpc: ec2.IVpc,
        serve_url: str,
        sign_in: SignIn | None = None,
        **kwargs,
    ) -> None:
        super().__init__(scope, construct_id, **kwargs)
        self.tokens = ApiTokens(self, "Tokens")
        self.bridge_security_group = ec2.SecurityGroup(
            self,
            "BridgeSecurityGroup",
            vpc=vpc,
            description="The bridge Lambdas: out to the Serve ingress (in the VPC) and AWS APIs (HTTPS)",
            allow_all_outbound=False,
        )
        self.bridge_security_group.add_egress_rule(
            ec2.Peer.ipv4(vpc.vpc_cidr_block), ec2.Port.tcp(SERVE_PORT), "the Serve ingress"
        )
        self.bridge_security_group.add_egress_rule(
            ec2.Peer.any_ipv4(), ec2.Port.tcp(443), "AWS APIs: @connections, Secrets Manager"
        )

        # Each function reads one secret: the authorizer the users' token, the handlers the bridge's.
        users = ("TOKEN_SECRET_ARN", self.tokens.api_token)
        bridge = ("BRIDGE_TOKEN_SECRET_ARN", self.tokens.bridge_token)
        # Only the authorizer checks Cognito's tokens.
        cognito_env = sign_in.authorizer_environment() if sign_in else {}
        code = bridge_code(RUNTIME)
        self.functions: dict[str, lambda_.Function] = {}
        for name, handler, timeout, (variable, secret), extra_env in (
            ("Authorizer", "lambda_bridge.authorizer.handler", Duration.seconds(10), users, cognito_env),
            ("Connect", "lambda_bridge.handlers.connect", HANDLER_TIMEOUT, bridge, {}),
            ("Default", "lambda_bridge.handlers.default", HANDLER_TIMEOUT, bridge, {}),
            ("Disconnect", "lambda_bridge.handlers.disconnect", HANDLER_TIMEOUT, bridge, {}),
        ):
            function = lambda_.Function(
                self,
                f"{name}Function",
                description=f"CSM voice bridge: {handler}",
                runtime=RUNTIME,
                handler=handler,
                code=code,
                timeout=timeout,
                memory_size=256,
                environment={
                    "SERVE_URL": serve_url,
                    "AUTH_MODE": "authorizer",
                    variable: secret.secret_arn,
                    **extra_env,
                },
                vpc=vpc,
                vpc_subnets=ec2.SubnetSelection(subnet_type=ec2.SubnetType.PRIVATE_WITH_EGRESS),
                security_groups=[self.bridge_security_group],
                log_group=logs.LogGroup(
                    self,
                    f"{name}Logs",
                    retention=logs.RetentionDays.ONE_MONTH,
                    removal_policy=RemovalPolicy.DESTROY,
                ),
                tracing=lambda_.Tracing.ACTIVE,
            )
            secret.grant_read(function)
            self._acknowledge_lambda(function)
            self.functions[name] = function

        authorizer = authorizers.WebSocketLambdaAuthorizer("TokenAuthorizer", self.functions["Authorizer"])
        self.api = apigwv2.WebSocketApi(
            self,
            "WebSocketApi",
            api_name="csm-voice",
            description="CSM voice conversations: the realtime protocol over API Gateway",
            route_selection_expression="$request.body.type",
            connect_route_options=apigwv2.WebSocketRouteOptions(
                integration=integrations.WebSocketLambdaIntegration(
                    "ConnectIntegration", self.functions["Connect"]
                ),
                authorizer=authorizer,
            ),
            default_route_options=apigwv2.WebSocketRouteOptions(
                integration=integrations.WebSocketLambdaIntegration(
                    "DefaultIntegration", self.functions["Default"]
                )
            ),
            disconnect_route_options=apigwv2.WebSocketRouteOptions(
                integration=integrations.WebSocketLambdaIntegration(
                    "DisconnectIntegration", self.functions["Disconnect"]
                )
            ),
        )
        # No identity source: the token may come as `?token=` (browsers) or as a header, and a listed
        # source that is absent makes API Gateway refuse without asking the authorizer.
        cfn_authorizer = self.api.node.find_child("TokenAuthorizer").node.default_child
        cfn_authorizer.add_property_deletion_override("IdentitySource")
        acknowledge(
            self.api,
            "AwsSolutions-APIG4",
            "API Gateway runs authorizers on $connect only; $default and $disconnect belong to a "
            "connection that $connect's authorizer already admitted.",
        )
        account = self._cloudwatch_role()
        self.access_logs = logs.LogGroup(
            self, "AccessLogs", retention=logs.RetentionDays.ONE_MONTH, removal_policy=RemovalPolicy.DESTROY
        )
        self.stage = apigwv2.WebSocketStage(
            self,
            "Stage",
            web_socket_api=self.api,
            stage_name=STAGE,
            auto_deploy=True,
            detailed_metrics_enabled=True,
            throttle=apigwv2.ThrottleSettings(
                rate_limit=settings.api_rate_limit, burst_limit=settings.api_burst_limit
            ),
            access_log_settings=_AccessLogs(self.access_logs),
        )
        self.stage.node.add_dependency(account)  # API Gateway refuses access logs until the role is set
        CfnOutput(self, "WebSocketUrl", value=self.stage.url, description="wss:// endpoint for the page")
        CfnOutput(
            self, "ApiTokenSecretArn", value=self.tokens.api_token.secret_arn, description="the users' token"
        )

    def bridge_link(self) -> BridgeLink:
        """What the cluster, deployed after this stack, takes from it."""
        return BridgeLink(
            api_token=self.tokens.api_token,
            bridge_token=self.tokens.bridge_token,
            stage=self.stage,
            bridge_security_group=self.bridge_security_group,
        )

    def _cloudwatch_role(self) -> apigw.CfnAccount:
        """API Gateway writes WebSocket access logs with the account's CloudWatch role (one per region
        and account). Kept when the stack goes, as other APIs of the account may use it too."""
        role = iam.Role(
            self,
            "ApiGatewayCloudWatchRole",
            assumed_by=iam.ServicePrincipal("apigateway.amazonaws.com"),
            managed_policies=[
                iam.ManagedPolicy.from_aws_managed_policy_name(
                    "service-role/AmazonAPIGatewayPushToCloudWatchLogs"
                )
            ],
        )
        role.apply_removal_policy(RemovalPolicy.RETAIN)
        account = apigw.CfnAccount(self, "ApiGatewayAccount", cloud_watch_role_arn=role.role_arn)
        account.apply_removal_policy(RemovalPolicy.RETAIN)
        acknowledge(
            role,
            "AwsSolutions-IAM4[Policy::arn:<AWS::Partition>:iam::aws:policy/service-role/"
            "AmazonAPIGatewayPushToCloudWatchLogs]",
            "The AWS managed policy made for exactly this role: API Gateway writing its logs.",
        )
        return account

    def _acknowledge_lambda(self, function: lambda_.Function) -> None:
        acknowledge(
            function,
            "AwsSolutions-L1",
            "Pinned to Python 3.12 (supported by Lambda until 2028) on purpose: a runtime upgrade is a "
            "deliberate, tested change of the bridge, not something a synth should drift into.",
        )
        role = function.role
        assert role is not None
        acknowledge(
            role,
            "AwsSolutions-IAM5[Resource::*]",
            "X-Ray's PutTraceSegments and PutTelemetryRecords (active tracing), which take no resource.",
        )
        for policy in ("AWSLambdaBasicExecutionRole", "AWSLambdaVPCAccessExecutionRole"):
            acknowledge(
                role,
                f"AwsSolutions-IAM4[Policy::arn:<AWS::Partition>:iam::aws:policy/service-role/{policy}]",
                "The AWS managed policies Lambda documents for logging and for the ENIs of a VPC function.",
            )
