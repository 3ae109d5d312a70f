"""A minimal Flower app directory for an installed metafleet: a pyproject naming metafleet's ServerApp and
ClientApp and holding the run config. ``flwr run`` ships it as the run's app; its code is the installed
package's, so the app is a few hundred bytes, not the repository."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    raise TypeError(f"run config values must be bool, int, float or str, got {value!r}")


def write_app_dir(folder: Path, run_config: dict[str, Any], name: str = "metafleet-run") -> Path:
    lines = [
        "[project]", f'name = "{name}"', 'version = "0.0.0"', 'description = "a metafleet run"',
        'license = "Apache-2.0"',
        "[tool.flwr.app]", 'publisher = "metafleet"',
        "[tool.flwr.app.components]", 'serverapp = "metafleet.server.app:app"',
        'clientapp = "metafleet.client.app:app"', "[tool.flwr.app.config]",
    ] + [f'"{key}" = {toml_value(value)}' for key, value in run_config.items()]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "pyproject.toml").write_text("\n".join(lines) + "\n")
    return folder
