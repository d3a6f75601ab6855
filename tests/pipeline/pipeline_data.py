"""Data files of the pipeline tests."""

from pathlib import Path

HERE = Path(__file__).parent
PROMPTS_FILE = HERE / "data" / "prompts.jsonl"  # 48 short prompts (jsonl, "prompt" column)
FAKE_VLLM = HERE / "fake_vllm"  # put on sys.path (or PYTHONPATH) to import the fake ``vllm``
