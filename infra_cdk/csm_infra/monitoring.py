"""Monitoring: alarms on every signal that means people cannot talk, to one SNS topic, and a dashboard.

| signal | alarm |
|---|---|
| API 5xx | `ExecutionError` of the stage (WebSocket APIs have no 5XXError; server-side failures count here) |
| API integration errors | `IntegrationError` of the stage (a bridge Lambda failed or timed out) |
| Lambda errors, throttles | per bridge function |
| running tasks | the head below 1; workers below their desired count for 15 minutes (no GPU capacity) |
| GPU utilisation | the nodes' mean above 90% for 15 minutes: add nodes (`max_nodes`) |
| Serve queue depth | requests waiting for a replica, 3 of 5 minutes |
| the publisher itself | no load metrics for 10 minutes (the head, or its publisher, is down) |
| drain notices | any in their dead-letter queue (a Spot notice not drained: nodes may stop undrained) |

The topic is encrypted with a key of its own (CloudWatch must be allowed to use it, which the AWS
managed SNS key does not allow) and refuses unencrypted publishing.
"""

from __future__ import annotations

from aws_cdk import CfnOutput, Duration, Stack
from aws_cdk import aws_apigatewayv2 as apigwv2
from aws_cdk import aws_cloudwatch as cloudwatch
from aws_cdk import aws_cloudwatch_actions as actions
from aws_cdk import aws_ecs as ecs
from aws_cdk import aws_iam as iam
from aws_cdk import aws_kms as kms
from aws_cdk import aws_lambda as lambda_
from aws_cdk import aws_sns as sns
from aws_cdk import aws_sns_subscriptions as subscriptions
from aws_cdk import aws_sqs as sqs
from constructs import Construct

from csm_infra.cluster import CLUSTER_NAME, load_metric
from csm_infra.config import Settings

FIVE_MINUTES = Duration.minutes(5)
AT_LEAST = cloudwatch.ComparisonOperator.GREATER_THAN_OR_EQUAL_TO_THRESHOLD


class MonitoringStack(Stack):
    def __init__(
        self,
        scope: Construct,
        construct_id: str,
        *,
        settings: Settings,
        api: apigwv2.WebSocketApi,
        stage: apigwv2.WebSocketStage,
        functions: dict[str, lambda_.IFunction],
        head_service: ecs.Ec2Service,
        worker_service: ecs.Ec2Service,
        drain_dead_letters: sqs.IQueue,
        **kwargs,
    ) -> None:
        super().__init__(scope, construct_id, **kwargs)
        key = kms.Key(self, "TopicKey", description="CSM voice alarm topic", enable_key_rotation=True)
        key.add_to_resource_policy(
            iam.PolicyStatement(
                principals=[iam.ServicePrincipal("cloudwatch.amazonaws.com")],
                actions=["kms:Decrypt", "kms:GenerateDataKey*"],
                resources=["*"],
            )
        )
        self.topic = sns.Topic(
            self, "Alarms", display_name="CSM voice alarms", master_key=key, enforce_ssl=True
        )
        if settings.alarm_email:
            self.topic.add_subscription(subscriptions.EmailSubscription(settings.alarm_email))
        self.alarms: list[cloudwatch.Alarm] = []

        api_dims = {"ApiId": api.api_id, "Stage": stage.stage_name}
        api_errors = self._metric("AWS/ApiGateway", "ExecutionError", api_dims, "Sum", FIVE_MINUTES)
        integration_errors = self._metric("AWS/ApiGateway", "IntegrationError", api_dims, "Sum", FIVE_MINUTES)
        self._alarm("Api5xx", api_errors, 5, "API Gateway failed to run requests (server-side errors)")
        self._alarm("ApiIntegrationErrors", integration_errors, 5, "the bridge Lambdas failed or timed out")
        for name, function in functions.items():
            # The authorizer fails on purpose ("Unauthorized") for every socket opened without a token.
            threshold = 50 if name == "Authorizer" else 5
            self._alarm(
                f"{name}Errors", function.metric_errors(period=FIVE_MINUTES), threshold, f"{name} errors"
            )
            self._alarm(
                f"{name}Throttles", function.metric_throttles(period=FIVE_MINUTES), 1, f"{name} was throttled"
            )

        head_running = self._tasks(head_service, "RunningTaskCount")
        self._alarm(
            "HeadNotRunning",
            head_running,
            1,
            "the Ray head is not running: no conversations are possible",
            comparison=cloudwatch.ComparisonOperator.LESS_THAN_THRESHOLD,
            missing=cloudwatch.TreatMissingData.BREACHING,
        )
        worker_gap = cloudwatch.MathExpression(
            expression="desired - running",
            using_metrics={
                "desired": self._tasks(worker_service, "DesiredTaskCount"),
                "running": self._tasks(worker_service, "RunningTaskCount"),
            },
            period=Duration.minutes(1),
            label="workers missing",
        )
        self._alarm(
            "WorkersMissing",
            worker_gap,
            1,
            "GPU workers wanted but not running (no capacity for the instance type?)",
            periods=15,
        )
        self._alarm(
            "GpuUtilizationHigh",
            load_metric("GpuUtilization"),
            90,
            "the GPUs are saturated: raise max_nodes, or this is as far as the cluster goes",
            periods=15,
            comparison=cloudwatch.ComparisonOperator.GREATER_THAN_THRESHOLD,
        )
        self._alarm(
            "ServeQueueDepth",
            load_metric("QueuedRequests", "Maximum"),
            10,
            "requests are waiting for Serve replicas",
            periods=5,
            datapoints=3,
            comparison=cloudwatch.ComparisonOperator.GREATER_THAN_THRESHOLD,
        )
        self._alarm(
            "LoadMetricsMissing",
            load_metric("Nodes", "SampleCount"),
            1,
            "no load metrics from the cluster: the head or its metrics publisher is down, so workers "
            "cannot scale",
            periods=10,
            comparison=cloudwatch.ComparisonOperator.LESS_THAN_THRESHOLD,
            missing=cloudwatch.TreatMissingData.BREACHING,
        )
        self._alarm(
            "DrainNoticesDeadLettered",
            drain_dead_letters.metric_approximate_number_of_messages_visible(
                period=FIVE_MINUTES, statistic="Maximum"
            ),
            1,
            "Spot interruption or rebalance notices went to the dead-letter queue (the head's drain handler"
            " failed them, or EventBridge could not deliver them): nodes may stop without a drain",
        )
        self._dashboard(api_errors, integration_errors, functions, head_service, worker_service)
        CfnOutput(self, "AlarmTopicArn", value=self.topic.topic_arn)

    @staticmethod
    def _metric(
        namespace: str, name: str, dims: dict[str, str], statistic: str, period: Duration
    ) -> cloudwatch.Metric:
        return cloudwatch.Metric(
            namespace=namespace, metric_name=name, dimensions_map=dims, statistic=statistic, period=period
        )

    @staticmethod
    def _tasks(service: ecs.Ec2Service, name: str) -> cloudwatch.Metric:
        return cloudwatch.Metric(
            namespace="ECS/ContainerInsights",
            metric_name=name,
            dimensions_map={"ClusterName": CLUSTER_NAME, "ServiceName": service.service_name},
            statistic="Average",
            period=Duration.minutes(1),
        )

    def _alarm(
        self,
        name: str,
        metric: cloudwatch.IMetric,
        threshold: float,
        description: str,
        *,
        periods: int = 1,
        datapoints: int | None = None,
        comparison: cloudwatch.ComparisonOperator = AT_LEAST,
        missing: cloudwatch.TreatMissingData = cloudwatch.TreatMissingData.NOT_BREACHING,
    ) -> None:
        alarm = cloudwatch.Alarm(
            self,
            name,
            alarm_name=f"csm-voice-{name}",
            alarm_description=description,
            metric=metric,
            threshold=threshold,
            evaluation_periods=periods,
            datapoints_to_alarm=datapoints,
            comparison_operator=comparison,
            treat_missing_data=missing,
        )
        alarm.add_alarm_action(actions.SnsAction(self.topic))
        alarm.add_ok_action(actions.SnsAction(self.topic))
        self.alarms.append(alarm)

    def _dashboard(
        self,
        api_errors: cloudwatch.Metric,
        integration_errors: cloudwatch.Metric,
        functions: dict[str, lambda_.IFunction],
        head_service: ecs.Ec2Service,
        worker_service: ecs.Ec2Service,
    ) -> None:
        dashboard = cloudwatch.Dashboard(self, "Dashboard", dashboard_name="csm-voice")
        dashboard.add_widgets(
            cloudwatch.AlarmStatusWidget(title="Alarms", alarms=self.alarms, width=24, height=4),
        )
        dashboard.add_widgets(
            cloudwatch.GraphWidget(
                title="Load", left=[load_metric("Conversations"), load_metric("OngoingRequests")], width=8
            ),
            cloudwatch.GraphWidget(
                title="Per node and queue",
                left=[load_metric("OngoingRequestsPerNode"), load_metric("QueuedRequests", "Maximum")],
                width=8,
            ),
            cloudwatch.GraphWidget(
                title="GPUs", left=[load_metric("GpuUtilization")], right=[load_metric("Nodes")], width=8
            ),
        )
        dashboard.add_widgets(
            cloudwatch.GraphWidget(
                title="Ray tasks running",
                left=[
                    self._tasks(head_service, "RunningTaskCount"),
                    self._tasks(worker_service, "RunningTaskCount"),
                ],
                width=8,
            ),
            cloudwatch.GraphWidget(title="API errors", left=[api_errors, integration_errors], width=8),
            cloudwatch.GraphWidget(
                title="Bridge Lambdas: errors and throttles",
                left=[f.metric_errors(period=FIVE_MINUTES) for f in functions.values()],
                right=[f.metric_throttles(period=FIVE_MINUTES) for f in functions.values()],
                width=8,
            ),
        )
        dashboard.add_widgets(
            cloudwatch.GraphWidget(
                title="Bridge Lambdas: duration (p90)",
                left=[f.metric_duration(period=FIVE_MINUTES, statistic="p90") for f in functions.values()],
                width=12,
            ),
            cloudwatch.GraphWidget(
                title="Ray tasks: CPU and memory",
                left=[head_service.metric_cpu_utilization(), worker_service.metric_cpu_utilization()],
                right=[head_service.metric_memory_utilization(), worker_service.metric_memory_utilization()],
                width=12,
            ),
        )
