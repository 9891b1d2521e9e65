"""Read an offline wandb run back, so tests can check what its dashboard will show with no network.

An offline run keeps everything in ``run-<id>.wandb``: LevelDB's log format (32 KiB blocks of records, each with a
7-byte header: checksum, length, type full/first/middle/last) after a 7-byte W&B header, each record one
``wandb_internal_pb2.Record`` (wandb's Python reader, ``wandb.sdk.internal.datastore``, is gone from recent
versions). Logged images and tables are files under ``files/media``.
"""
from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List

import pytest

BLOCK = 32 * 1024
FILE_HEADER = struct.Struct("<4sHB")  # b":W&B", magic 0xBEE1, version 0
RECORD_HEADER = struct.Struct("<IHB")  # checksum, length, type
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def record_bytes(path: Path) -> List[bytes]:
    data = Path(path).read_bytes()
    ident, magic, version = FILE_HEADER.unpack_from(data)
    assert (ident, magic, version) == (b":W&B", 0xBEE1, 0), f"{path} is not a wandb record log"
    records, parts, position = [], b"", FILE_HEADER.size
    while position + RECORD_HEADER.size <= len(data):
        left = BLOCK - position % BLOCK
        if left < RECORD_HEADER.size:  # a block's tail too short for a header is padding
            position += left
            continue
        _, length, kind = RECORD_HEADER.unpack_from(data, position)
        if kind == 0:  # zero padding to the end of the block
            position += left
            continue
        chunk = data[position + RECORD_HEADER.size:position + RECORD_HEADER.size + length]
        position += RECORD_HEADER.size + length
        if kind == FULL:
            records.append(chunk)
        elif kind == FIRST:
            parts = chunk
        elif kind == MIDDLE:
            parts += chunk
        elif kind == LAST:
            records.append(parts + chunk)
            parts = b""
    return records


def _put(target: dict, item) -> None:
    path = list(item.nested_key) or [item.key]
    for key in path[:-1]:
        target = target.setdefault(key, {})
    target[path[-1]] = json.loads(item.value_json)


@dataclass
class OfflineRun:
    directory: Path
    group: str = ""
    job_type: str = ""
    name: str = ""
    metrics: List = field(default_factory=list)  # wandb_internal_pb2.MetricRecord, as define_metric sent them
    history: List[Dict] = field(default_factory=list)  # one dict per logged step
    summary: Dict = field(default_factory=dict)
    config: Dict = field(default_factory=dict)  # custom charts are panels in config["_wandb"]["visualize"]

    def charts(self) -> Dict[str, dict]:
        """Custom charts (``wandb.plot.*``): key -> panel config (its ``panelDefId``, ``fieldSettings``...)."""
        panels = self.config.get("_wandb", {}).get("visualize", {})
        return {key: panel["panel_config"] for key, panel in panels.items()}

    def step_metric(self, key: str) -> str:
        """The x-axis declared for ``key`` (by its name or a glob such as ``test/*``); '' if none."""
        for metric in self.metrics:
            glob = metric.glob_name
            if metric.name == key or (glob and key.startswith(glob.rstrip("*")) and glob.endswith("*")):
                return metric.step_metric
        return ""

    def history_keys(self) -> set:
        return {key for row in self.history for key in row if not key.startswith("_")}

    def media(self) -> List[Path]:
        return sorted(p.relative_to(self.directory / "files" / "media")
                      for p in (self.directory / "files" / "media").rglob("*") if p.is_file())


def read_offline_run(directory: Path) -> OfflineRun:
    from wandb.proto import wandb_internal_pb2 as pb

    directory = Path(directory)
    (log_file,) = directory.glob("run-*.wandb")
    run = OfflineRun(directory=directory)
    for raw in record_bytes(log_file):
        record = pb.Record()
        record.ParseFromString(raw)
        kind = record.WhichOneof("record_type")
        if kind == "run":  # the first; later run records (updates) may leave these fields empty
            run.group = run.group or record.run.run_group
            run.job_type = run.job_type or record.run.job_type
            run.name = run.name or record.run.display_name
        elif kind == "metric":
            run.metrics.append(record.metric)
        elif kind == "history":
            row: dict = {}
            for item in record.history.item:
                _put(row, item)
            run.history.append(row)
        elif kind == "summary":
            for item in record.summary.update:
                _put(run.summary, item)
        elif kind == "config":
            for item in record.config.update:
                _put(run.config, item)
    return run


def offline_runs(folder: Path) -> List[Path]:
    """The offline run directories under ``folder`` (wandb/offline-run-*), oldest first."""
    return sorted(p for p in Path(folder).rglob("offline-run-*") if p.is_dir())


@pytest.fixture
def offline_wandb(tmp_path, monkeypatch):
    """wandb offline, writing only under tmp_path, whatever the caller's environment says (import this fixture)."""
    for name in ("WANDB_MODE", "WANDB_DIR", "WANDB_PROJECT", "WANDB_RUN_GROUP", "WANDB_JOB_TYPE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    return tmp_path
