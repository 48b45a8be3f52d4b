"""A custom benchmark for tests: prints N numbered lines and writes a JSON result."""

import json
import os
import sys

count = int(os.environ.get("KITT_PARAM_LINES", "5"))
for i in range(count):
    print(f"line {i}", flush=True)
print("to stderr", file=sys.stderr, flush=True)
with open(os.environ["KITT_PARAMS_FILE"]) as fh:
    params = json.load(fh)
result = {"lines": count, "params": params, "model": os.environ.get("KITT_MODEL")}
with open(os.environ["KITT_RESULT_FILE"], "w") as fh:
    json.dump(result, fh)
sys.exit(int(os.environ.get("KITT_PARAM_EXIT", "0")))
