#!/usr/bin/env python3
"""Oracle for sdlora's replay of the random numbers sd-scripts' console handler draws
(src/data/log.rs): renders log records through rich's RichHandler exactly as sd-scripts'
setup_logging installs it, with each record's pathname / lineno set to the given sd-scripts call
site, and reports what Python's global `random` gives afterwards.

    rich_log_draws.py CASES.json OUT.json

CASES.json: [{"seed", "level" ("INFO", "WARNING", ... or "plain"), "pre_seed": [[file, line,
levelname], ...], "records": [[file, line, levelname, message], ...]}]. For each case: a fresh
handler and an empty Style.parse cache; the pre_seed records are logged, then random.seed(seed),
then the records; OUT.json gets [{"randint": random.randint(0, 2**31), "random53": random.random()
· 2**53 as an int (exact in JSON)}].
"""
import json
import logging
import random
import sys

from rich.console import Console
from rich.logging import RichHandler
from rich.style import Style

SD_SCRIPTS = "/opt/sd-scripts"  # any absolute root: only "same path or not" matters


def main():
    cases = json.load(open(sys.argv[1]))
    out = []
    log = logging.getLogger("sdlora_oracle")
    log.propagate = False
    for c in cases:
        Style.parse.cache_clear()
        for h in list(log.handlers):
            log.removeHandler(h)
        if c["level"] == "plain":
            h = logging.StreamHandler(sys.stderr)
            log.setLevel(logging.INFO)
        else:
            h = RichHandler(console=Console(stderr=True))
            log.setLevel(getattr(logging, c["level"]))
        h.setFormatter(logging.Formatter(fmt="%(message)s", datefmt="%Y-%m-%d %H:%M:%S"))
        log.addHandler(h)

        def emit(file, line, level, msg):
            lv = getattr(logging, level)
            if log.isEnabledFor(lv):
                rec = log.makeRecord(log.name, lv, f"{SD_SCRIPTS}/{file}", line, msg, None, None)
                log.handle(rec)

        for file, line, level in c["pre_seed"]:
            emit(file, line, level, "before the seed")
        random.seed(c["seed"])
        for file, line, level, msg in c["records"]:
            emit(file, line, level, msg)
        out.append({"randint": random.randint(0, 2**31), "random53": int(random.random() * 2**53)})
    json.dump(out, open(sys.argv[2], "w"))


if __name__ == "__main__":
    main()
