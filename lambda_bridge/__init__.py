"""API Gateway WebSocket ↔ Ray Serve: the Lambda handlers.

In AWS the browser's socket ends at API Gateway. Every client message invokes `handlers.default`,
which forwards it to the Serve ingress's bridge endpoint over HTTP and returns at once; the ingress
sends the conversation's events back through API Gateway's `@connections` API. `handlers.connect`
and `handlers.disconnect` open and end the conversation; `authorizer.handler` checks the token on
`$connect`.

The handlers import only the standard library and boto3, so the CDK deploys this folder as a plain
asset, all of it: `devtools.local_gateway` (a development and test tool, never deployed) runs the same
handlers behind a WebSocket server that behaves like API Gateway.
"""
