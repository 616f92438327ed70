"""Command-line helpers shared by the benchmark scripts."""
from __future__ import annotations

import argparse
import json
from pathlib import Path


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


def parse_choices(parser: argparse.ArgumentParser, option: str, text: str, choices) -> list[str]:
    """A comma-separated list of `choices` in `text`, or a parser error naming `option`."""
    picked = [x.strip() for x in text.split(",") if x.strip()]
    if not picked or set(picked) - set(choices):
        parser.error(f"{option}: expected a comma-separated list of {', '.join(choices)}, got {text!r}")
    return picked


def tagged(stem: str, tag: str) -> str:
    """A results file's stem: `stem`, or `stem_tag` when `--tag` is given."""
    return f"{stem}_{tag}" if tag else stem


def save_json(results: Path, stem: str, tag: str, result: dict) -> Path:
    """Write `result` to results/<stem>[_<tag>].json (creating the folder); returns the path."""
    results.mkdir(parents=True, exist_ok=True)
    path = results / f"{tagged(stem, tag)}.json"
    path.write_text(json.dumps(result, indent=2))
    return path
