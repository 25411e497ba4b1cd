"""tools/gpu/token2wav_ops.py (the launch count behind the H100 finding) runs on the tiny model and reports, per
chunk call, operations and flow frames for the state cache off and on: streaming calls before the final one
compute fewer frames with the cache, and the final call (full attention, no cache) computes the same."""
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_token2wav_ops_reports_operations_and_frames_per_call():
    out = subprocess.run([sys.executable, str(REPO / "tools/gpu/token2wav_ops.py"), "--size", "tiny"],
                         capture_output=True, text=True, timeout=600, check=True).stdout
    rows = {}
    for line in out.splitlines():
        if line.startswith("| cache "):
            label = line.split("|")[1].split(":")[0].strip()
            rows[label] = [(int(n.replace(",", "")), int(f)) for n, f in re.findall(r"([\d,]+) \((\d+)\)", line)]
    off, on = rows["cache off"], rows["cache on"]
    assert len(off) == len(on) >= 3
    assert all(n > 0 for n, _ in off + on)
    assert all(f_on < f_off for (_, f_on), (_, f_off) in zip(on[:-1], off[:-1]))   # streaming calls reuse blocks
    assert on[-1][1] == off[-1][1]                                                # the final call recomputes
