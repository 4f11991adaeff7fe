"""Read back what W&B wrote to an offline run file (`run-*.wandb`): LevelDB-style log records of protobufs."""
from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Iterator

from wandb.proto import wandb_internal_pb2 as pb

BLOCK = 32768  # bytes per log block
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def _chunks(path: Path) -> Iterator[bytes]:
    data = path.read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B run file"
    pos, pending = 7, b""  # 7-byte file header: ident, magic, version
    while pos + 7 <= len(data):
        left = BLOCK - pos % BLOCK
        if left < 7:  # a block's tail too short for a record header is padding
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk = data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind == FULL:
            yield chunk
        elif kind == FIRST:
            pending = chunk
        elif kind == MIDDLE:
            pending += chunk
        elif kind == LAST:
            yield pending + chunk
        else:
            return


def read_run(path: Path) -> dict:
    """{'config': {...}, 'history': [row, ...], 'summary': {...}} from an offline run file."""
    out = {"config": {}, "history": [], "summary": {}}
    for raw in _chunks(path):
        record = pb.Record()
        record.ParseFromString(raw)
        kind = record.WhichOneof("record_type")
        if kind == "history":
            out["history"].append({i.key or "/".join(i.nested_key): json.loads(i.value_json)
                                   for i in record.history.item})
        elif kind == "summary":
            out["summary"].update({i.key or "/".join(i.nested_key): json.loads(i.value_json)
                                   for i in record.summary.update})
        elif kind == "run":
            out["config"].update({i.key: json.loads(i.value_json) for i in record.run.config.update})
    return out
