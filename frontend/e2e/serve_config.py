"""Write the browser tests' Serve config: the repository's serve_config.yaml, deep-merged with overrides.

Usage: serve_config.py SOURCE.yaml DEST.yaml OVERRIDES_JSON, where the overrides are
{"http_options": {...}, "args": {...}} (args merge into the single application's args).
"""

import json
import sys

import yaml


def merge(base: dict, extra: dict) -> dict:
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            merge(base[key], value)
        else:
            base[key] = value
    return base


def main(source: str, dest: str, overrides: str) -> None:
    with open(source) as f:
        config = yaml.safe_load(f)
    extra = json.loads(overrides)
    merge(config.setdefault("http_options", {}), extra.get("http_options", {}))
    (app,) = config["applications"]
    merge(app.setdefault("args", {}), extra.get("args", {}))
    with open(dest, "w") as f:
        yaml.safe_dump(config, f, sort_keys=False)


if __name__ == "__main__":
    main(*sys.argv[1:])
