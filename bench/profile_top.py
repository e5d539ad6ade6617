"""Where a py-spy profile's samples go: the functions that hold them (self) and the
cio-retl functions under which they fall (inclusive), as shares of every sample.

    uv run python bench/profile_top.py FILE [--top 25]

FILE is py-spy's collapsed-stack output (``py-spy record -f raw``, as
``bench/floor.py --profile FILE`` writes it): one line per stack, frames joined by ``;``,
then a space and the number of samples.
"""

from __future__ import annotations

import argparse
from collections import Counter
from pathlib import Path


def read(path: Path) -> list[tuple[list[str], int]]:
    stacks = []
    for line in path.read_text().splitlines():
        frames, _, count = line.rpartition(" ")
        if frames and count.isdigit():
            stacks.append((frames.split(";"), int(count)))
    return stacks


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("file", type=Path)
    parser.add_argument("--top", type=int, default=25)
    args = parser.parse_args()
    stacks = read(args.file)
    total = sum(n for _, n in stacks) or 1
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    threads: Counter[str] = Counter()
    for frames, n in stacks:
        own[frames[-1]] += n
        threads[frames[0]] += n
        for frame in dict.fromkeys(f for f in frames if "cio_retl" in f):
            inclusive[frame] += n
    print(f"{total:,} samples")
    for title, counter in (("thread", threads), ("self", own), ("inclusive, cio_retl", inclusive)):
        print(f"\n{title}:")
        for frame, n in counter.most_common(args.top):
            print(f"  {100 * n / total:5.1f}%  {frame}")


if __name__ == "__main__":
    main()
