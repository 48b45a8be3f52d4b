"""The benchmark the log pipeline measurement runs: N lines stamped with their emit time.

Parameters (environment): KITT_PARAM_LINES, KITT_PARAM_RATE (lines/s, 0 = as fast as
possible), KITT_PARAM_START (a file to wait for, so the subscriber is attached first).
"""

import os
import sys
import time

count = int(os.environ["KITT_PARAM_LINES"])
rate = float(os.environ.get("KITT_PARAM_RATE", "0"))
start_file = os.environ.get("KITT_PARAM_START")
deadline = time.monotonic() + 60
while start_file and not os.path.exists(start_file) and time.monotonic() < deadline:
    time.sleep(0.01)
out = sys.stdout
t0 = time.monotonic()
for i in range(count):
    if rate:
        due = t0 + i / rate
        while (now := time.monotonic()) < due:
            time.sleep(min(due - now, 0.001))
    out.write(f"{i} {time.time_ns()} payload-{'x' * 60}\n")
    if rate:
        out.flush()
out.flush()
