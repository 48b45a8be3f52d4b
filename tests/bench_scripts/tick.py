"""A custom benchmark for tests: prints a numbered tick every INTERVAL seconds until the
RELEASE file appears, then writes {"ticks": N}. It runs for as long as the test needs
(through a network cut, say) and its log says exactly which lines must arrive.
"""

import json
import os
import time

release = os.environ["KITT_PARAM_RELEASE"]
interval = float(os.environ.get("KITT_PARAM_INTERVAL", "0.1"))
deadline = time.monotonic() + 600
ticks = 0
while not os.path.exists(release) and time.monotonic() < deadline:
    print(f"tick {ticks:06d}", flush=True)
    ticks += 1
    time.sleep(interval)
with open(os.environ["KITT_RESULT_FILE"], "w") as fh:
    json.dump({"ticks": ticks, "released": os.path.exists(release)}, fh)
