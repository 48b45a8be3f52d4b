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
if os.environ.get("KITT_PARAM_BIG") == "true":
    # 300k CJK characters: ~900 KB as UTF-8 on disk, ~1.8 MB once JSON-escaped.
    result["text"] = "\u6d4b" * 300_000
with open(os.environ["KITT_RESULT_FILE"], "w", encoding="utf-8") as fh:
    json.dump(result, fh, ensure_ascii=False)
sys.exit(int(os.environ.get("KITT_PARAM_EXIT", "0")))
