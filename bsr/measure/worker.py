"""The fresh process of `bsr bench` that measures one method's memory: `python -m bsr.measure.worker < request.json`.

Reads `{"spec": {...BenchSpec...}, "method": NAME}` from stdin, runs `bsr.measure.bench.memory_record`, and prints
one line `BSR_BENCH_RECORD {...}` with the record (or `{"error": ...}` and exit status 2 for a `BSRError`). A fresh
process per method, because a process's peak resident memory cannot be reset below what earlier work left in its heap.
"""

from __future__ import annotations

import json
import sys

from ..errors import BSRError
from .bench import memory_record
from .bench_spec import RECORD_PREFIX, BenchSpec


def main() -> int:
    request = json.loads(sys.stdin.read())
    try:
        record = memory_record(BenchSpec.from_dict(request["spec"]), request["method"])
    except BSRError as e:
        print(RECORD_PREFIX + json.dumps({"error": str(e)}), flush=True)
        return 2
    print(RECORD_PREFIX + json.dumps(record), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
