"""Where the numbers come from (device and library versions), and the JSON a run leaves behind."""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import platform
from pathlib import Path

import torch

OUTPUT_PATHS = ("json", "csv")  # options naming where results go: not part of the recorded config


def environment(device: torch.device) -> dict:
    """The device's name and the versions of the libraries that compute on it."""
    try:
        triton_version = importlib.metadata.version("triton")
    except importlib.metadata.PackageNotFoundError:
        triton_version = "not installed"
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine()
    return {
        "device": f"{name} ({device})",
        "torch": torch.__version__,
        "transformers": importlib.metadata.version("transformers"),
        "triton": triton_version,
    }


def environment_line(env: dict) -> str:
    """The environment as the first line a run prints."""
    return " | ".join(f"{key} {value}" for key, value in env.items())


def recorded_config(args: argparse.Namespace) -> dict:
    """The options a run was given, less where its results go."""
    return {key: value for key, value in vars(args).items() if key not in OUTPUT_PATHS}


def write_json(path: Path, result: dict) -> None:
    path.write_text(json.dumps(result, indent=2, default=str) + "\n")
