"""The CDK constructs and stacks of the AWS deployment, one module per concern (see ../app.py)."""
