"""Drain notices: EC2's Spot interruption warnings and rebalance recommendations, queued for the Ray head.

    EC2 ─► EventBridge (default bus, rule on source aws.ec2) ─► SQS queue ─► the head's drain handler

The handler (`python -m serve_app.node_drain` on the head; it reads `CSM_DRAIN_QUEUE_URL`,
`CSM_CLUSTER_NAME` and `AWS_REGION`) maps the notice's EC2 instance id to the Ray node running there
(ECS: container instance → task → its address) and asks Ray's GCS to drain that node by the notice's
deadline, so Serve starts replacement replicas on the other nodes before the old ones stop. Notices for
instances of other clusters in the account are in the queue too; the handler ignores them.

A notice is stale within minutes (a Spot interruption comes two minutes ahead), so the queue keeps
messages for an hour only. A message the handler fails on three times, or one EventBridge could not
deliver, goes to the dead-letter queue, kept for a day for someone to look at. Both queues are encrypted
(SQS-managed keys, which EventBridge can send to) and refuse requests without TLS.
"""

from __future__ import annotations

from aws_cdk import Duration, Stack
from aws_cdk import aws_ecs as ecs
from aws_cdk import aws_events as events
from aws_cdk import aws_events_targets as targets
from aws_cdk import aws_iam as iam
from aws_cdk import aws_sqs as sqs
from constructs import Construct

from csm_infra.nag import acknowledge

DETAIL_TYPES = ("EC2 Spot Instance Interruption Warning", "EC2 Instance Rebalance Recommendation")
QUEUE_ACTIONS = ("sqs:ReceiveMessage", "sqs:DeleteMessage")  # what serve_app/node_drain.py calls


class DrainNotices(Construct):
    def __init__(self, scope: Construct, construct_id: str) -> None:
        super().__init__(scope, construct_id)
        self.dead_letters = sqs.Queue(
            self,
            "DeadLetters",
            encryption=sqs.QueueEncryption.SQS_MANAGED,
            enforce_ssl=True,
            retention_period=Duration.days(1),
        )
        self.queue = sqs.Queue(
            self,
            "Queue",
            encryption=sqs.QueueEncryption.SQS_MANAGED,
            enforce_ssl=True,
            retention_period=Duration.hours(1),
            # The handler deletes a notice once the drain is requested, seconds after receiving it.
            visibility_timeout=Duration.seconds(30),
            dead_letter_queue=sqs.DeadLetterQueue(max_receive_count=3, queue=self.dead_letters),
        )
        self.rule = events.Rule(
            self,
            "Rule",
            description="Spot interruption warnings and rebalance recommendations, for the Ray head to drain",
            event_pattern=events.EventPattern(source=["aws.ec2"], detail_type=list(DETAIL_TYPES)),
            targets=[targets.SqsQueue(self.queue, dead_letter_queue=self.dead_letters, retry_attempts=3)],
        )

    def grant_handler(self, role: iam.IRole, cluster: ecs.ICluster, cluster_name: str) -> None:
        """What the drain handler on the head needs: take notices off the queue, and read which task of
        `cluster` (named `cluster_name`, a literal: it is part of the task ARNs) runs on the instance a
        notice names."""
        self.queue.grant(role, *QUEUE_ACTIONS)
        stack = Stack.of(self)

        def arn(resource: str) -> str:
            return stack.format_arn(service="ecs", resource=resource, resource_name=f"{cluster_name}/*")

        role.add_to_principal_policy(
            iam.PolicyStatement(actions=["ecs:ListContainerInstances"], resources=[cluster.cluster_arn])
        )
        role.add_to_principal_policy(
            iam.PolicyStatement(
                actions=["ecs:ListTasks"],
                resources=["*"],
                conditions={"ArnEquals": {"ecs:cluster": cluster.cluster_arn}},
            )
        )
        role.add_to_principal_policy(
            iam.PolicyStatement(actions=["ecs:DescribeTasks"], resources=[arn("task")])
        )
        acknowledge(
            role,
            "AwsSolutions-IAM5[Resource::*]",
            "ecs:ListTasks names a container instance as its resource, known only when a notice comes; "
            "the statement is limited to this cluster by the ecs:cluster condition.",
        )
        acknowledge(
            role,
            f"AwsSolutions-IAM5[Resource::arn:{stack.partition}:ecs:{stack.region}:<AWS::AccountId>:"
            f"task/{cluster_name}/*]",
            "The drain handler describes the tasks on the instance a notice names; their ids are only "
            "known then. Limited to this cluster's.",
        )
