"""The task's data, read from the JSONL beside this file (lm-evaluation-harness `custom_dataset`)."""

import json
from pathlib import Path

import datasets


def load(**kwargs) -> datasets.DatasetDict:
    rows = [json.loads(line) for line in (Path(__file__).parent / "shakespeare_cloze.jsonl").read_text().splitlines()]
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})
