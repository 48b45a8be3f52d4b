"""A custom benchmark for tests: starts a grandchild, records pids, waits for a release file.

The test decides when it ends (by creating the release file) or cancels it; the pids
file lets the test check that a cancel killed the whole process group.
"""

import json
import os
import subprocess
import sys
import time

release = os.environ["KITT_PARAM_RELEASE"]
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
with open(os.environ["KITT_PARAM_PIDS"], "w") as fh:
    json.dump({"main": os.getpid(), "child": child.pid}, fh)
print("holding", flush=True)
deadline = time.monotonic() + 120
while not os.path.exists(release) and time.monotonic() < deadline:
    time.sleep(0.05)
child.kill()
with open(os.environ["KITT_RESULT_FILE"], "w") as fh:
    json.dump({"released": os.path.exists(release)}, fh)
