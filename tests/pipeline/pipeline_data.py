"""Data files of the pipeline tests."""

from pathlib import Path

PROMPTS_FILE = Path(__file__).parent / "data" / "prompts.jsonl"  # 48 short prompts (jsonl, "prompt" column)
