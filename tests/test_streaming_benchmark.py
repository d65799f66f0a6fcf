"""benchmarks/streaming.py --json: the one JSON object a script reads (issue 30), on a tiny model."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from conftest import make_tiny

ROOT = Path(__file__).resolve().parents[1]
KEYS = ["encode_x_realtime", "decode_x_realtime", "decode_low_latency_x_realtime"]


def test_streaming_benchmark_json(tmp_path: Path) -> None:
    make_tiny().save_pretrained(tmp_path / "tiny")
    run = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "streaming.py"), "--model", str(tmp_path / "tiny"),
                          "--chunks", "4", "--threads", "1", "--json", "--baseline"],
                         capture_output=True, text=True, timeout=600, check=False)
    assert run.returncode == 0, run.stderr[-2000:]
    out = json.loads(run.stdout)  # nothing but the object on stdout
    assert out["threads"] == 1 and out["chunks"] == 4 and out["commit"]
    for key in KEYS + ["nntilde_" + k for k in KEYS]:
        assert isinstance(out[key], float) and out[key] > 0, key
    assert set(out["baseline"]) == {"decode_x_realtime", "decode_low_latency_x_realtime",
                                    "nntilde_decode_x_realtime", "nntilde_decode_low_latency_x_realtime"}
    bad = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "streaming.py"), "--json", "--threads", "1", "2"],
                         capture_output=True, text=True, timeout=120, check=False)
    assert bad.returncode == 2 and "one thread count" in bad.stderr
