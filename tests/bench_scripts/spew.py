"""A custom benchmark for tests: waits for a release file, then prints many numbered lines.

Parameters: RELEASE (path, optional), LINES (count), WIDTH (characters per line), and
ODD=true to add a line with invalid UTF-8 and one far longer than the agent's limit.
"""

import os
import sys
import time

release = os.environ.get("KITT_PARAM_RELEASE")
deadline = time.monotonic() + 60
while release and not os.path.exists(release) and time.monotonic() < deadline:
    time.sleep(0.02)
count = int(os.environ.get("KITT_PARAM_LINES", "100"))
width = int(os.environ.get("KITT_PARAM_WIDTH", "20"))
out = sys.stdout.buffer
for i in range(count):
    out.write(f"{i:08d} ".encode() + b"x" * width + b"\n")
if os.environ.get("KITT_PARAM_ODD") == "true":
    out.write(b"bad bytes \xff\xfe here\n")
    out.write(b"L" * 20000 + b"\n")
out.flush()
