"""Command-line helpers shared by the benchmark scripts."""
from __future__ import annotations

import argparse
import json


def parse_settings(parser: argparse.ArgumentParser, text: str) -> dict:
    """`--settings`: the JSON object of AttentionPack settings in `text`, or a parser error
    naming the option."""
    try:
        settings = json.loads(text)
    except json.JSONDecodeError as e:
        parser.error(f"--settings must be a JSON object of AttentionPack settings: {e}")
    if not isinstance(settings, dict):
        parser.error(f"--settings must be a JSON object of AttentionPack settings, got {text!r}")
    return settings
