"""Summarise a py-spy `--format raw` profile (collapsed stacks): where the time goes.

    .venv/bin/python bench/profile_top.py bench/results/profile-check.txt [--top 30] [--app]

Prints, per function, its self share (samples where it is the innermost frame) and its total
share (samples where it is anywhere on the stack), with `--app` restricted to frames in app/.
"""

from __future__ import annotations

import argparse
import re
from collections import Counter
from pathlib import Path

FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>.*?)(?::(?P<line>\d+))?\)$")


def short(frame: str) -> str:
    m = FRAME.match(frame)
    if not m:
        return frame
    path = m.group("file")
    for marker in ("site-packages/", "/work/main/", "lib/python3.11/"):
        if marker in path:
            path = path.split(marker, 1)[1]
            break
    return f"{m.group('func')} ({path})"


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("profile", type=Path)
    p.add_argument("--top", type=int, default=30)
    p.add_argument("--app", action="store_true", help="only frames under app/")
    opts = p.parse_args()
    self_time: Counter[str] = Counter()
    total: Counter[str] = Counter()
    samples = 0
    for line in opts.profile.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack:
            continue
        n = int(count)
        frames = [short(f) for f in stack.split(";")]
        samples += n
        self_time[frames[-1]] += n
        for f in set(frames):
            total[f] += n

    def keep(frame: str) -> bool:
        return " (app/" in frame or not opts.app

    print(f"{samples} samples")
    print(f"\n{'self %':>7}  function")
    for f, n in [(f, n) for f, n in self_time.most_common() if keep(f)][: opts.top]:
        print(f"{100 * n / samples:7.1f}  {f}")
    print(f"\n{'total %':>7}  function")
    for f, n in [(f, n) for f, n in total.most_common() if keep(f)][: opts.top]:
        print(f"{100 * n / samples:7.1f}  {f}")


if __name__ == "__main__":
    main()
