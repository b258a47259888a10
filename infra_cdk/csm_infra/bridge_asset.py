"""The bridge Lambdas' code: the `lambda_bridge` package alone, copied at synth time (no Docker).

The handlers import only the standard library and boto3 (which the Lambda runtime provides), so the
asset is the package's modules under `lambda_bridge/`, the layout the handler names
(`lambda_bridge.handlers.connect`) expect; anything that is not a module (`__pycache__`) is left out.
The package holds only what is deployed: its emulator lives in `devtools/`, so no file is filtered by name.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import jsii
from aws_cdk import BundlingOptions, ILocalBundling
from aws_cdk import aws_lambda as lambda_

PACKAGE = "lambda_bridge"


def package_dir() -> Path:
    return Path(__file__).resolve().parents[2] / PACKAGE


def modules(source: Path) -> list[Path]:
    """The package's modules that go into the asset."""
    return sorted(source.glob("*.py"))


@jsii.implements(ILocalBundling)
class _CopyModules:
    def __init__(self, source: Path) -> None:
        self.source = source

    def try_bundle(self, output_dir: str, _options: BundlingOptions) -> bool:
        target = Path(output_dir) / PACKAGE
        target.mkdir(parents=True, exist_ok=True)
        for module in modules(self.source):
            shutil.copy2(module, target / module.name)
        return True


def bridge_code(runtime: lambda_.Runtime) -> lambda_.Code:
    source = package_dir()
    return lambda_.Code.from_asset(
        str(source),
        exclude=["__pycache__", "*.pyc"],
        bundling=BundlingOptions(image=runtime.bundling_image, local=_CopyModules(source)),
    )
