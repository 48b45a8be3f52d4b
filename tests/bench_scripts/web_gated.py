"""A custom benchmark for the dashboard's tests: prints its log in rounds, each round once
its gate file appears, so a test decides when lines arrive without sleeping.

Parameters: GATES (a folder; round r waits for GATES/go-r), ROUNDS, LINES (per round).
Every fifth line says WARN, for the log search.
"""

import json
import os
import time
from pathlib import Path

gates = Path(os.environ["KITT_PARAM_GATES"])
rounds = int(os.environ.get("KITT_PARAM_ROUNDS", "1"))
count = int(os.environ.get("KITT_PARAM_LINES", "10"))
for r in range(rounds):
    deadline = time.monotonic() + 120
    while not (gates / f"go-{r}").exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    for i in range(count):
        level = "WARN slow step" if i % 5 == 0 else "ok"
        print(f"round {r} line {i:02d} {level}", flush=True)
with open(os.environ["KITT_RESULT_FILE"], "w") as fh:
    json.dump({"rounds": rounds, "lines": rounds * count}, fh)
